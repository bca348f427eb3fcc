// One machine (#/machines/<mac>): its current boot as a stage bar, the doctor's verdict in words,
// power buttons with the verified outcome, what it was given, and its events with its syslog
// lines (newest last, older pages on request). Events of this machine arrive whole on the
// stream and are appended as they are; the rest (boot, verdict, power state, what it was given)
// is re-read after a short pause, since a boot sends events in bursts.

import { ApiError, get, getJSON, machinePath, send } from "/ui/api.js";
import { reauthorize, requireSignIn } from "/ui/auth.js";
import { duration, el, size, when } from "/ui/format.js";
import { debounced, onEvent, onOpen } from "/ui/live.js";
import { openEnroll } from "/ui/machines.js";

export const STAGES = [
  ["dhcp", "DHCP"],
  ["loader", "Loader"],
  ["script", "Script"],
  ["kernel", "Kernel"],
  ["initrd", "Initrd"],
  ["os", "OS"],
  ["up", "Up"],
  ["joined", "Joined"],
];
const EVENTS_PAGE = 100;
const STALL_CHECK = 5000; // ms
const ACTIONS = { on: "Powering on", off: "Powering off", cycle: "Power-cycling" };
const $ = (id) => document.getElementById(id);

let route = ""; // the machine on screen as its URL names it, MAC or name ("" when hidden)
let mac = ""; // its MAC, which events carry
let view = null; // its MachineView
let oldest = ""; // the Link to the previous page of events
const shown = new Set(); // event ids in #events
let acting = false;
let setError = () => {};

/** Each stage of `boot` with its status: done, current, pending or failed. */
export function stageStatuses(boot) {
  const reached = new Map((boot ? boot.stages : []).map((stage) => [stage.stage, stage]));
  const last = Math.max(-1, ...STAGES.map(([id], index) => (reached.has(id) ? index : -1)));
  const anyFailed = boot ? boot.stages.some((stage) => stage.failed) : false;
  return STAGES.map(([id, label], index) => {
    const stage = reached.get(id) || null;
    let status = "pending";
    if (stage) status = stage.failed ? "failed" : "done";
    else if (boot && index === last + 1) {
      if (boot.outcome === "booting") status = "current";
      else if (boot.outcome === "failed" && !anyFailed) status = "failed";
    }
    return { id, label, stage, status };
  });
}

function drawStagebar(boot) {
  const items = stageStatuses(boot).map(({ id, label, stage, status }) => {
    const li = el("li");
    li.dataset.stage = id;
    li.dataset.status = status;
    li.append(el("span", label, "stage-name"));
    const detail = [];
    if (stage) {
      detail.push(`+${duration(Math.max(0, stage.at - boot.started))}`);
      if (stage.bytes) detail.push(size(stage.bytes));
    } else if (status === "current") {
      detail.push("waiting…");
    } else if (status === "failed") {
      detail.push("did not happen");
    }
    li.append(el("span", detail.join(" · ") || "—", "stage-detail"));
    li.title = `${label}: ${status}${stage ? `, at ${new Date(stage.at * 1000).toLocaleTimeString()}` : ""}`;
    return li;
  });
  $("stagebar").replaceChildren(...items);
  const about = $("boot-when");
  about.replaceChildren();
  if (!boot) {
    about.textContent = "(no boot seen yet)";
    return;
  }
  about.append("(started ", when(boot.started));
  if (boot.seconds_to_up !== null && boot.seconds_to_up !== undefined) {
    about.append(`, ${boot.outcome === "joined" ? "joined" : "up"} in ${duration(boot.seconds_to_up)}`);
  } else if (boot.outcome === "failed") {
    about.append(", failed");
  }
  about.append(")");
}

function drawFacts() {
  $("machine-title").textContent = view.name || `${view.mac} (discovered)`;
  const facts = $("machine-facts");
  const parts = [view.mac, view.ip, view.vendor, [view.arch, view.firmware].filter(Boolean).join(" / ")];
  facts.replaceChildren(el("span", view.state, `state state-${view.state}`));
  for (const part of parts.filter(Boolean)) facts.append(" ", el("span", part, "fact"));
  if (view.secure_boot) {
    // The OS's own claim at its latest phone-home (nothing on the wire shows it); an OS that
    // does not report it shows nothing.
    const secure = el("span", `Secure Boot: ${view.secure_boot}`, "fact");
    secure.id = "secure-boot";
    secure.dataset.value = view.secure_boot;
    secure.title = "as the machine's OS reported it when it phoned home (its own claim)";
    facts.append(" ", secure);
  }
  if (view.last_seen) facts.append(" ", el("span", "seen ", "fact"), when(view.last_seen));
  if (view.state === "discovered") {
    const button = el("button", "Enroll", "enroll");
    button.type = "button";
    button.addEventListener("click", () => openEnroll(view.mac));
    facts.append(" ", button);
  }
  const state = $("power-state");
  state.replaceChildren(el("span", view.power, `power power-${view.power}`));
  if (view.power_since) state.append(" since ", when(view.power_since));
  if (view.power_detail) state.append(el("span", ` (${view.power_detail})`, "muted"));
  const controlled = (view.power_control || []).length > 0;
  $("power-note").textContent = controlled
    ? `Through ${view.power_control.join(", then ")}; each action waits until the new state is seen.`
    : view.enrolled
      ? 'No power control: add power = { driver = "…" } to its entry in lab.toml.'
      : "Enroll it first, then give it power control in lab.toml.";
  for (const button of document.querySelectorAll("button[data-power]")) {
    button.disabled = !controlled || acting;
  }
}

function drawGiven(given) {
  const rows = [
    ["Image", given.image],
    ["Kernel", given.kernel],
    ["Initrd", given.initrd],
    ["Address", given.ip],
    ["Gateway", given.gateway],
    ["DNS", (given.dns || []).join(", ")],
  ];
  const items = [];
  for (const [term, value] of rows) {
    items.push(el("dt", term), el("dd", value || "—", value ? "mono" : "muted"));
  }
  items.push(el("dt", "Secrets"));
  const secrets = given.secrets || [];
  if (!secrets.length) {
    items.push(el("dd", "none released", "muted"));
  } else {
    const dd = el("dd");
    const list = el("ul", "", "secrets");
    for (const secret of secrets) {
      const li = el("li");
      li.append(el("span", secret.what, "secret"), ` to ${secret.to}, `, when(secret.when));
      list.append(li);
    }
    dd.append(list);
    items.push(dd);
  }
  $("given").replaceChildren(...items);
}

function eventItem(event) {
  const li = el("li");
  li.dataset.kind = event.kind;
  li.dataset.id = String(event.id);
  const family = event.kind.split(".")[0];
  li.classList.add(`kind-${family}`);
  if (event.kind === "syslog" && event.fields.severity) li.dataset.severity = String(event.fields.severity);
  li.append(when(event.time, true), el("span", event.kind, "kind"), el("span", event.message, "message"));
  return li;
}

function addEvents(events, atStart) {
  const fresh = events.filter((event) => !shown.has(event.id));
  for (const event of fresh) shown.add(event.id);
  const list = $("events");
  const stick = !atStart && list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
  const items = fresh.map(eventItem);
  if (atStart) list.prepend(...items);
  else list.append(...items);
  if (stick) list.scrollTop = list.scrollHeight;
  $("events-count").textContent = `(${shown.size}${oldest ? "+" : ""})`;
}

// Events the stream delivers while the newest page is being read: the page may have been
// answered before they happened, so they are added again once it is drawn (ids deduplicate).
let arriving = null;

async function loadEvents() {
  const wanted = route;
  const early = [];
  arriving = early;
  const page = await get(machinePath(wanted, `/events?limit=${EVENTS_PAGE}`)).finally(() => {
    if (arriving === early) arriving = null;
  });
  if (wanted !== route) return; // another machine is on screen now
  shown.clear();
  $("events").replaceChildren();
  oldest = page.next;
  $("older").hidden = !oldest;
  addEvents(page.data, false);
  addEvents(early.filter((event) => event.id > (page.data.at(-1)?.id ?? 0)), false);
  $("events").scrollTop = $("events").scrollHeight;
}

async function loadOlder() {
  if (!oldest) return;
  const list = $("events");
  const before = list.scrollHeight;
  const wanted = route;
  const page = await get(oldest);
  if (wanted !== route) return;
  oldest = page.next;
  $("older").hidden = !oldest;
  addEvents(page.data, true);
  list.scrollTop += list.scrollHeight - before; // keep what was on screen in place
}

/** Each part on its own: an agent without one endpoint still shows the rest. */
async function loadParts() {
  const wanted = route;
  const parts = await Promise.allSettled([
    getJSON(machinePath(wanted)),
    getJSON(machinePath(wanted, "/boots?limit=1")),
    getJSON(machinePath(wanted, "/doctor")),
    getJSON(machinePath(wanted, "/given")),
  ]);
  if (wanted !== route) return;
  const [machine, boots, doctor, given] = parts;
  if (machine.status === "rejected") throw machine.reason;
  view = machine.value;
  mac = view.mac; // #/machines/<name> works too: events name the machine by its MAC
  drawFacts();
  if (boots.status === "fulfilled") {
    const list = boots.value;
    drawStagebar(list.length ? list[list.length - 1] : null);
  }
  const verdict = $("verdict");
  if (doctor.status === "fulfilled") {
    verdict.textContent = doctor.value.verdict;
    verdict.dataset.ok = String(Boolean(doctor.value.ok));
    // Still within the doctor's waits: progress, not a failure (the API says so; the page
    // never reads it from the sentence).
    verdict.dataset.waiting = String(Boolean(doctor.value.waiting));
  } else {
    verdict.textContent = `The doctor could not say: ${doctor.reason.message}`;
    verdict.dataset.ok = "false";
    verdict.dataset.waiting = "false";
  }
  if (given.status === "fulfilled") drawGiven(given.value);
  else $("given").replaceChildren(el("dd", given.reason.message, "muted"));
}

async function load() {
  try {
    await Promise.all([loadParts(), loadEvents()]);
    setError("");
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      $("machine-title").textContent = route;
      setError(`${route} is not known to this agent (forgotten, or never seen): see the machine list.`);
    } else {
      setError(String(error.message || error));
    }
  }
}

const reread = debounced(() => {
  if (!route) return;
  loadParts().catch((error) => setError(String(error.message || error)));
});

function setOutcome(state, text) {
  const outcome = $("power-outcome");
  outcome.dataset.outcome = state;
  outcome.textContent = text;
  outcome.hidden = false;
}

async function power(action) {
  const target = view ? view.name || view.mac : mac;
  const why = `${ACTIONS[action]} ${target} is an action: sign in first.`;
  if (!(await requireSignIn(why))) return;
  acting = true;
  drawFacts();
  $("power-steps").replaceChildren();
  setOutcome("pending", `${ACTIONS[action]} ${target}… waiting until it is seen ${action === "off" ? "off" : "on"}.`);
  try {
    const outcome = await send("POST", machinePath(mac, "/power"), { action });
    setOutcome(outcome.outcome === "ok" ? "done" : "failed", `${outcome.message} (${duration(outcome.seconds)})`);
  } catch (error) {
    if (await reauthorize(error, why)) {
      acting = false;
      return power(action);
    }
    setOutcome("refused", error.message);
  } finally {
    acting = false;
    if (view) drawFacts();
    reread();
  }
}

export const machineView = {
  section: "view-machine",
  setup(showError) {
    setError = showError;
    for (const button of document.querySelectorAll("button[data-power]")) {
      button.addEventListener("click", () => power(button.dataset.power));
    }
    $("older").addEventListener("click", () => {
      loadOlder().catch((error) => setError(String(error.message || error)));
    });
    onEvent((event) => {
      // Until the machine itself is read, a view opened by name (#/machines/c1) knows no MAC
      // yet: the event's name says it is this machine's.
      const ours = event.mac && (event.mac === mac || (event.name && event.name === route));
      if (!ours) return;
      if (arriving) arriving.push(event);
      addEvents([event], false);
      if (event.kind.startsWith("power.")) {
        const step = el("li", "", `step step-${event.fields.outcome || "info"}`);
        step.append(when(event.time, true), " ", event.message);
        $("power-steps").append(step);
      }
      reread();
    });
    onOpen(() => {
      if (route) load();
    });
    // A boot that stalls sends no event: the doctor's verdict changes with time alone ("fetched
    // iPXE but never the script" once the wait is over), so a booting machine is re-read.
    setInterval(() => {
      if (mac && view && (view.state === "booting" || acting)) reread();
    }, STALL_CHECK);
  },
  show(params) {
    let raw = params[0] || "";
    try {
      raw = decodeURIComponent(raw);
    } catch {
      // a malformed %-escape: look it up as typed, the API says it is unknown
    }
    const wanted = /^[0-9a-f]{2}(?:[:-][0-9a-f]{2}){5}$/i.test(raw) ? raw.toLowerCase() : raw;
    if (wanted !== route) {
      route = wanted;
      mac = wanted;
      view = null;
      oldest = "";
      shown.clear();
      for (const id of ["events", "stagebar", "given", "power-steps", "machine-facts", "power-state", "power-note"]) {
        $(id).replaceChildren();
      }
      $("machine-title").textContent = route;
      $("verdict").textContent = "";
      $("power-outcome").hidden = true;
      delete $("power-outcome").dataset.outcome;
    }
    document.title = `${route} · Pixiebox`;
    load().then(() => {
      if (view) document.title = `${view.name || view.mac} · Pixiebox`;
    });
  },
  hide() {
    route = "";
    mac = "";
  },
};
