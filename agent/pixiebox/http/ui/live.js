// The one EventSource of the page (GET /api/v1/events). Views subscribe to its events and to
// "opened" (the stream is (re)connected: re-read what might have changed meanwhile). The stream
// names each event by its kind, and an EventSource only delivers named events to listeners for
// those names: the kinds come from <html data-kinds>, filled in by the agent.

import { API } from "/ui/api.js";

const listeners = new Set();
const openers = new Set();
let source = null;

/** fn(event) for every event; returns the function that unsubscribes. */
export function onEvent(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

/** fn() whenever the stream (re)opens. */
export function onOpen(fn) {
  openers.add(fn);
  return () => openers.delete(fn);
}

export function isOpen() {
  return source !== null && source.readyState === EventSource.OPEN;
}

export function start() {
  const live = document.getElementById("live");
  source = new EventSource(`${API}/events`);
  const kinds = (document.documentElement.dataset.kinds || "").split(/\s+/).filter(Boolean);
  const deliver = (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return; // a frame that is not an EventView is not for this page
    }
    for (const fn of listeners) {
      try {
        fn(event);
      } catch (error) {
        console.error(error);
      }
    }
  };
  for (const kind of kinds) source.addEventListener(kind, deliver);
  let first = true;
  source.addEventListener("open", () => {
    live.textContent = "live";
    live.dataset.state = "live";
    live.title = "updates as events happen";
    first = false;
    for (const fn of openers) fn();
  });
  source.addEventListener("error", () => {
    live.textContent = first ? "cannot reach the agent; retrying…" : "reconnecting…";
    live.dataset.state = "down";
  });
}

/** A debounced call: a boot sends bursts of events, one re-read per burst is enough. */
export function debounced(fn, delay = 150) {
  let timer = 0;
  return () => {
    if (timer) return;
    timer = setTimeout(() => {
      timer = 0;
      fn();
    }, delay);
  };
}
