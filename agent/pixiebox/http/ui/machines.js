// The machine list (#/): every machine from GET /api/v1/machines (every page), kept live from the
// event stream. An event only says which machine changed; its row is re-read from
// GET /api/v1/machines/{mac}, so the page shows what the API shows and never re-derives a state
// from kinds (the agent's lifecycle does that, in one place). The Last boot column comes from
// GET /api/v1/lab/timeline (one read for all: the latest boot of every enrolled machine).
//
// Discovered machines sit on top with an Enroll button: the form is prefilled with what the
// agent would choose (GET …/enroll) and a refusal lists pixiebox check's words.

import { API, ApiError, getAll, getJSON, machinePath, send } from "/ui/api.js";
import { reauthorize, requireSignIn } from "/ui/auth.js";
import { duration, el, when } from "/ui/format.js";
import { debounced, onEvent, onOpen } from "/ui/live.js";

const PAGE = 500; // the API's largest page
const $ = (id) => document.getElementById(id);

const machines = new Map(); // mac -> MachineView, in the API's order
const boots = new Map(); // mac -> latest BootView (or null)
const pending = new Set(); // MACs waiting for a re-read
let sortKey = "";
let sortUp = true;
let query = "";
let only = "";
let drawQueued = false;
let visible = false;
let setError = () => {};
let enrolling = "";
let built = new Map(); // mac -> { signature, tr }: the rows on the page

async function loadRows() {
  const seen = await getAll(`${API}/machines?limit=${PAGE}`);
  machines.clear();
  for (const view of seen) machines.set(view.mac, view);
}

async function loadAll() {
  await loadRows();
  await loadBoots();
  draw();
}

// Reads of the timeline can overlap (a burst, a reconnect) and answers can come back out of
// order on a busy appliance: only an answer newer than the one shown may replace it.
let bootsAsked = 0;
let bootsShown = 0;

async function loadBoots() {
  const ticket = ++bootsAsked;
  try {
    const timeline = await getJSON(`${API}/lab/timeline`);
    if (ticket < bootsShown) return;
    bootsShown = ticket;
    boots.clear();
    for (const row of timeline.machines || []) boots.set(row.mac, row.boot);
  } catch {
    // an agent without the timeline: the column stays empty
  }
}

const rowAsked = new Map(); // mac -> the newest read of that row sent (answers can overtake)

async function refresh(mac) {
  const ticket = (rowAsked.get(mac) || 0) + 1;
  rowAsked.set(mac, ticket);
  const stale = () => rowAsked.get(mac) !== ticket;
  try {
    const view = await getJSON(machinePath(mac));
    if (!stale()) machines.set(mac, view);
  } catch (error) {
    if (stale()) return;
    if (error instanceof ApiError && error.status === 404) {
      machines.delete(mac); // forgotten (a discovered machine past forget_discovered_after)
    } else {
      throw new Error(`${mac}: ${error.message}`);
    }
  }
}

// Rows to re-read beyond which one read of the whole list is cheaper: a DHCP storm sends
// hundreds of events a second, and hundreds of parallel reads queue behind the browser's six
// connections per host (one is the event stream) until a new machine's row waits for seconds.
const MANY_ROWS = 12;
const RETRY_AFTER = 2000; // ms: a read that failed (agent busy, restarting) is tried again
let reading = false;

// One batch of reads in flight at a time: events that come meanwhile only add their MAC to
// `pending`, and the loop takes them when the batch is done. A failed read keeps its MACs
// pending and tries again later: an update is never dropped because one read failed.
const flush = debounced(async () => {
  if (reading) return; // the loop below takes what is pending
  reading = true;
  let failed = false;
  try {
    for (let round = 0; pending.size && round < 50; round++) {
      const macs = [...pending];
      pending.clear();
      try {
        if (macs.length > MANY_ROWS) await loadRows();
        else await Promise.all(macs.map(refresh));
        setError("");
      } catch (error) {
        for (const mac of macs) pending.add(mac);
        setError(String(error.message || error));
        failed = true;
        setTimeout(flush, RETRY_AFTER);
        break;
      }
      draw();
    }
  } finally {
    reading = false;
  }
  if (pending.size && !failed) flush(); // the round bound was reached: go on after a breath
});

// The Last boot column: the whole lab's timeline is a bigger read than a row, and a boot's
// events come in bursts: at most one read every two seconds, apart from the rows' own.
const flushBoots = debounced(async () => {
  await loadBoots();
  draw();
}, 2000);
const BOOT_KINDS = /^(?:dhcp|tftp|http|os|machine|power)\./;

// --- drawing ---------------------------------------------------------------------------------

function lastBoot(mac) {
  return boots.get(mac) || null;
}

function value(view, key) {
  switch (key) {
    case "arch":
      return [view.arch, view.firmware].filter(Boolean).join(" / ");
    case "last_seen":
      return view.last_seen ?? -1;
    case "last_boot": {
      const boot = lastBoot(view.mac);
      return boot ? boot.started : -1;
    }
    default:
      return view[key] ?? "";
  }
}

function matches(view) {
  if (only && view.state !== only) return false;
  if (!query) return true;
  const words = [view.name, view.mac, view.ip, view.vendor, view.mac.replaceAll(":", "-")];
  return words.some((word) => word && word.toLowerCase().includes(query));
}

function ordered() {
  const rows = [...machines.values()].filter(matches);
  const position = new Map(rows.map((view, index) => [view.mac, index]));
  rows.sort((a, b) => {
    // Machines not in lab.toml stay on top whatever the sort: they are the ones waiting for a
    // person (an unknown machine that booted under [boot] unknown = "discover" is one too).
    const discovered = (!b.enrolled) - (!a.enrolled);
    if (discovered) return discovered;
    if (sortKey) {
      const x = value(a, sortKey);
      const y = value(b, sortKey);
      const order = typeof x === "number" && typeof y === "number"
        ? x - y
        : String(x).localeCompare(String(y), undefined, { numeric: true });
      if (order) return sortUp ? order : -order;
    }
    return position.get(a.mac) - position.get(b.mac);
  });
  return rows;
}

// The value goes in a span, so its style (monospace, italic) is not the card label's; an
// empty cell stays empty (a card hides it).
function cell(tr, label, content, className) {
  const td = document.createElement("td");
  td.dataset.label = label;
  let node = content;
  if (!(content instanceof Node) && content) node = el("span", content);
  if (node instanceof Node) {
    if (className) node.classList.add(...className.split(" "));
    td.append(node);
  }
  tr.append(td);
  return td;
}

function nameCell(view) {
  const link = document.createElement("a");
  link.href = `#/machines/${view.mac}`;
  link.textContent = view.name || "(discovered)";
  link.className = view.name ? "name" : "name unnamed";
  return link;
}

function powerCell(view) {
  const power = el("span", view.power || "unknown", `power power-${view.power || "unknown"}`);
  power.title = view.power_detail
    || (view.power_control && view.power_control.length ? "" : "no power control in lab.toml");
  return power;
}

function bootCell(mac) {
  const boot = lastBoot(mac);
  if (!boot) return "";
  const span = el("span", "", `boot boot-${boot.outcome}`);
  const label = boot.outcome === "up" || boot.outcome === "joined"
    ? `${boot.outcome} in ${duration(boot.seconds_to_up)}`
    : boot.outcome;
  span.append(el("span", label), " · ", when(boot.started));
  return span;
}

function row(view) {
  const tr = document.createElement("tr");
  tr.dataset.mac = view.mac;
  tr.dataset.state = view.state;
  const name = cell(tr, "Name", nameCell(view));
  if (!view.enrolled) { // also once it booted up under [boot] unknown = "discover"
    const button = el("button", "Enroll", "enroll");
    button.type = "button";
    button.setAttribute("aria-label", `Enroll ${view.mac}`);
    button.addEventListener("click", () => openEnroll(view.mac));
    name.append(" ", button);
  }
  cell(tr, "MAC", view.mac, "mono");
  const vendor = cell(tr, "Vendor", view.vendor || "", "vendor");
  if (view.vendor) vendor.title = view.vendor;
  cell(tr, "Address", view.ip || "", "mono");
  // Secure Boot as the machine's OS reported it, only when on (off is the cell's plain meaning).
  const secure = view.secure_boot === "on" ? "Secure Boot" : "";
  cell(tr, "Arch / firmware", [value(view, "arch"), secure].filter(Boolean).join(" · "));
  cell(tr, "State", el("span", view.state, `state state-${view.state}`));
  cell(tr, "Power", powerCell(view));
  cell(tr, "Last seen", view.last_seen ? when(view.last_seen) : "never");
  cell(tr, "Last boot", bootCell(view.mac));
  return tr;
}

function draw() {
  if (drawQueued || !visible) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    // Keep the keyboard where it was: a row is rebuilt, the focused button is found again.
    const focused = document.activeElement;
    const focusMac = focused && focused.closest ? focused.closest("tr[data-mac]")?.dataset.mac : "";
    const focusWhat = focused && focused.classList.contains("enroll") ? ".enroll" : "a";
    const rows = ordered();
    // A row is rebuilt only when what it shows changed: the others keep their elements (and
    // the keyboard's place, and a text selection) while a boot sends its bursts.
    const fresh = new Map();
    const trs = rows.map((view) => {
      const signature = JSON.stringify([view, lastBoot(view.mac)]);
      const kept = built.get(view.mac);
      const tr = kept && kept.signature === signature ? kept.tr : row(view);
      fresh.set(view.mac, { signature, tr });
      return tr;
    });
    built = fresh;
    const body = $("rows");
    const same = trs.length === body.children.length && trs.every((tr, i) => body.children[i] === tr);
    if (!same) body.replaceChildren(...trs);
    if (focusMac && !body.contains(focused)) {
      const again = body.querySelector(`tr[data-mac="${CSS.escape(focusMac)}"] ${focusWhat}`);
      if (again) again.focus();
    }
    drawSummary();
    const total = machines.size;
    $("count").textContent = rows.length === total ? `(${total})` : `(${rows.length} of ${total})`;
    $("empty").hidden = total > 0;
  });
}

const STATES = ["discovered", "booting", "up", "joined", "enrolled", "off"];

/** "1 discovered · 2 up": the lab at a glance; each count filters the list to its state. */
function drawSummary() {
  const counts = new Map();
  for (const view of machines.values()) counts.set(view.state, (counts.get(view.state) || 0) + 1);
  const items = [];
  for (const state of STATES) {
    if (!counts.get(state)) continue;
    const button = el("button", `${counts.get(state)} ${state}`, `chip state-${state}`);
    button.type = "button";
    button.setAttribute("aria-pressed", String(only === state));
    button.addEventListener("click", () => {
      only = only === state ? "" : state;
      $("filter").value = only;
      draw();
    });
    items.push(button);
  }
  $("summary").replaceChildren(...items);
}

// --- enroll ----------------------------------------------------------------------------------

export async function openEnroll(mac) {
  if (!(await requireSignIn(`Enrolling ${mac} changes lab.toml: sign in first.`))) return;
  enrolling = mac;
  const form = $("enroll-form");
  $("enroll-title").textContent = `Enroll ${mac}`;
  const view = machines.get(mac);
  $("enroll-what").textContent = view && view.vendor
    ? `${view.vendor}, ${value(view, "arch") || "firmware not reported"}: it is added to lab.toml, comments kept.`
    : "It is added to lab.toml, comments kept.";
  showEnrollProblems("", []);
  form.elements.name.value = "";
  form.elements.ip.value = "";
  if (!$("enroll-dialog").open) $("enroll-dialog").showModal();
  form.elements.name.focus();
  try {
    const chosen = await getJSON(machinePath(mac, "/enroll"));
    if (enrolling !== mac) return;
    if (!form.elements.name.value) form.elements.name.value = chosen.name || "";
    if (!form.elements.ip.value) form.elements.ip.value = chosen.ip || "";
    form.elements.name.select();
  } catch (error) {
    showEnrollProblems(error.message, error.problems || []);
  }
}

function showEnrollProblems(sentence, problems) {
  $("enroll-error").textContent = sentence;
  $("enroll-error").hidden = !sentence;
  $("enroll-problems").replaceChildren(...problems.map((problem) => el("li", problem)));
}

async function submitEnroll(event) {
  event.preventDefault();
  const form = $("enroll-form");
  const mac = enrolling;
  const body = {};
  const name = form.elements.name.value.trim();
  const ip = form.elements.ip.value.trim();
  if (name) body.name = name;
  if (ip) body.ip = ip;
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  showEnrollProblems("", []);
  try {
    const view = await send("POST", machinePath(mac, "/enroll"), body);
    machines.set(view.mac, view);
    $("enroll-dialog").close("enrolled");
    draw();
  } catch (error) {
    if (await reauthorize(error, "Enrolling needs a sign-in.")) {
      button.disabled = false;
      return submitEnroll(event);
    }
    showEnrollProblems(error.message, error.problems || []);
  } finally {
    button.disabled = false;
  }
}

// --- setup -----------------------------------------------------------------------------------

function setupSorting() {
  for (const th of document.querySelectorAll("#machines th[data-key]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.key;
      sortUp = sortKey === key ? !sortUp : true;
      sortKey = key;
      for (const other of document.querySelectorAll("#machines th[data-key]")) {
        other.removeAttribute("aria-sort");
      }
      th.setAttribute("aria-sort", sortUp ? "ascending" : "descending");
      draw();
    });
  }
}

export const machinesView = {
  section: "view-machines",
  setup(showError) {
    setError = showError;
    setupSorting();
    $("search").addEventListener("input", (event) => {
      query = event.target.value.trim().toLowerCase();
      draw();
    });
    $("filter").addEventListener("change", (event) => {
      only = event.target.value;
      draw();
    });
    $("enroll-form").addEventListener("submit", submitEnroll);
    $("enroll-dialog").addEventListener("close", () => {
      enrolling = "";
    });
    onEvent((event) => {
      if (!event.mac) return; // MAC "": the lab's own log, no row
      pending.add(event.mac);
      flush();
      if (BOOT_KINDS.test(event.kind)) flushBoots();
    });
    // The stream replays nothing on first connect: read the list once it is open, so no change
    // falls between the two. After a reconnect a re-read also catches forgotten machines.
    onOpen(() => {
      loadAll().then(() => setError(""), (error) => setError(String(error.message || error)));
    });
  },
  show() {
    visible = true;
    document.title = "Machines · Pixiebox";
    draw();
  },
  hide() {
    visible = false;
  },
};
