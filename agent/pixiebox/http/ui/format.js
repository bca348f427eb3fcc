// How the dashboard writes times, sizes and durations for people. A time is shown relative ("3
// minutes ago") in a <time> element whose datetime and title hold the absolute one, and
// refresh() keeps every relative text true without re-reading anything.

const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
const absolute = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const clock = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });

export function ago(seconds) {
  const delta = seconds - Date.now() / 1000;
  const size = Math.abs(delta);
  if (size < 60) return relative.format(Math.round(delta), "second");
  if (size < 3600) return relative.format(Math.round(delta / 60), "minute");
  if (size < 86400) return relative.format(Math.round(delta / 3600), "hour");
  return relative.format(Math.round(delta / 86400), "day");
}

export function absoluteTime(seconds) {
  return absolute.format(new Date(seconds * 1000));
}

export function clockTime(seconds) {
  return clock.format(new Date(seconds * 1000));
}

/** <time datetime="ISO" title="absolute">3 minutes ago</time>; `fixed` shows the clock time. */
export function when(seconds, fixed = false) {
  const element = document.createElement("time");
  element.dateTime = new Date(seconds * 1000).toISOString();
  element.title = absoluteTime(seconds);
  element.className = "when";
  if (fixed) {
    element.textContent = clockTime(seconds);
  } else {
    element.dataset.t = String(seconds);
    element.textContent = ago(seconds);
  }
  return element;
}

/** Re-writes every relative time on the page (called every few seconds). */
export function refresh() {
  for (const element of document.querySelectorAll("time[data-t]")) {
    element.textContent = ago(Number(element.dataset.t));
  }
}

export function size(bytes) {
  if (bytes === null || bytes === undefined) return "";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 || value >= 100 ? 0 : 1)} ${units[unit]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

/** An element with text: el("span", "text", "class names"). */
export function el(tag, text = "", className = "") {
  const element = document.createElement(tag);
  if (text) element.textContent = text;
  if (className) element.className = className;
  return element;
}

const SVG = "http://www.w3.org/2000/svg";

/** An SVG element with attributes: svg("rect", { x: 1, y: 2 }). */
export function svg(tag, attributes = {}, text = "") {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  if (text) element.textContent = text;
  return element;
}
