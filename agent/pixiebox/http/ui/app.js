// The dashboard's entry: hash routes on one page (#/ machines, #/machines/<mac> one machine,
// #/lab, #/settings), the header (live state, sign-in), and the one event stream shared by the
// views. Plain ES modules from /ui/, no build step, no library: every file is in
// pixiebox.http.dashboard.FILES, the only ones the agent serves.
//
// The DOM is built with textContent only: names, vendors, syslog lines come from the network.

import { setupAuth } from "/ui/auth.js";
import { refresh } from "/ui/format.js";
import { start } from "/ui/live.js";
import { labView } from "/ui/lab.js";
import { machineView } from "/ui/machine.js";
import { machinesView } from "/ui/machines.js";
import { settingsView } from "/ui/settings.js";

const $ = (id) => document.getElementById(id);
const ROUTES = [
  [/^#?\/?$/, machinesView, "machines"],
  [/^#\/machines\/([^/]+)$/, machineView, "machines"],
  [/^#\/lab$/, labView, "lab"],
  [/^#\/settings$/, settingsView, "settings"],
];
let current = null;

function setError(text) {
  const error = $("error");
  error.textContent = text;
  error.hidden = !text;
}

function route() {
  const hash = location.hash || "#/";
  const found = ROUTES.find(([pattern]) => pattern.test(hash));
  if (!found) {
    location.replace("#/");
    return;
  }
  const [pattern, view, tab] = found;
  const params = hash.match(pattern).slice(1);
  if (current && current !== view) current.hide();
  for (const [, other] of ROUTES) $(other.section).hidden = other !== view;
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    if (link.dataset.view === tab) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const changed = current !== view;
  current = view;
  setError("");
  view.show(params);
  if (changed) $("content").focus({ preventScroll: true });
}

function setup() {
  for (const view of [machinesView, machineView, labView, settingsView]) view.setup(setError);
  setupAuth();
  window.addEventListener("hashchange", route);
  route();
  setInterval(refresh, 15_000); // keeps "2 minutes ago" true
  start();
}

setup();
