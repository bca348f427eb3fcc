// The dashboard's machine list: loaded from GET /api/v1/machines (every page), then kept live
// from the event stream GET /api/v1/events. An event only says which machine changed; the row
// is re-read from GET /api/v1/machines/{mac}, so the page shows what the API shows and never
// re-derives a state from kinds (the agent's lifecycle does that, in one place).
//
// The DOM is built with textContent only: names, vendors and addresses come from the network.

const API = "/api/v1";
const PAGE = 500; // the API's largest page
const REFRESH_DELAY = 150; // ms: a boot sends bursts of events; one read per machine per burst

const machines = new Map(); // mac -> MachineView, in the API's order
const pending = new Set(); // MACs waiting for a re-read
let refreshTimer = 0;
let sortKey = "";
let sortUp = true;
let query = "";
let drawQueued = false;

const $ = (id) => document.getElementById(id);

function setError(text) {
  const error = $("error");
  error.textContent = text;
  error.hidden = !text;
}

function nextLink(header) {
  // RFC 8288: <url>; rel="next"
  for (const part of (header || "").split(",")) {
    const match = part.match(/<([^>]*)>\s*;\s*rel="?next"?/);
    if (match) return match[1];
  }
  return "";
}

async function loadAll() {
  const seen = new Map();
  let url = `${API}/machines?limit=${PAGE}`;
  while (url) {
    const answer = await fetch(url, { headers: { Accept: "application/json" } });
    if (!answer.ok) throw new Error(`the machine list answered ${answer.status}`);
    for (const view of await answer.json()) seen.set(view.mac, view);
    url = nextLink(answer.headers.get("Link"));
  }
  machines.clear();
  for (const [mac, view] of seen) machines.set(mac, view);
  draw();
}

async function refresh(mac) {
  const answer = await fetch(`${API}/machines/${encodeURIComponent(mac)}`);
  if (answer.status === 404) {
    machines.delete(mac); // forgotten (a discovered machine past [boot] forget_discovered_after)
  } else if (answer.ok) {
    machines.set(mac, await answer.json());
  } else {
    throw new Error(`${mac}: the API answered ${answer.status}`);
  }
}

function schedule(mac) {
  pending.add(mac);
  if (refreshTimer) return;
  refreshTimer = setTimeout(async () => {
    refreshTimer = 0;
    const macs = [...pending];
    pending.clear();
    try {
      await Promise.all(macs.map(refresh));
      setError("");
    } catch (error) {
      setError(String(error.message || error));
    }
    draw();
  }, REFRESH_DELAY);
}

function subscribe() {
  const live = $("live");
  const source = new EventSource(`${API}/events`);
  const kinds = (document.documentElement.dataset.kinds || "").split(/\s+/).filter(Boolean);
  const onEvent = (message) => {
    try {
      const event = JSON.parse(message.data);
      if (event.mac) schedule(event.mac); // MAC "": the lab's own log, no row
    } catch {
      // a frame that is not an EventView is not for this page
    }
  };
  for (const kind of kinds) source.addEventListener(kind, onEvent);
  let first = true;
  source.addEventListener("open", () => {
    live.textContent = "live";
    live.dataset.state = "live";
    // The stream replays nothing on first connect: read the list once it is open, so no change
    // falls between the two. After a reconnect the browser sends Last-Event-ID and the agent
    // replays what was missed, but a re-read is cheap and also catches forgotten machines.
    loadAll().then(() => setError(""), (error) => setError(String(error.message || error)));
    first = false;
  });
  source.addEventListener("error", () => {
    live.textContent = first ? "cannot reach the agent; retrying…" : "reconnecting…";
    live.dataset.state = "down";
  });
}

// --- drawing ---------------------------------------------------------------------------------

const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

function ago(seconds) {
  const delta = seconds - Date.now() / 1000;
  const size = Math.abs(delta);
  if (size < 60) return relative.format(Math.round(delta), "second");
  if (size < 3600) return relative.format(Math.round(delta / 60), "minute");
  if (size < 86400) return relative.format(Math.round(delta / 3600), "hour");
  return relative.format(Math.round(delta / 86400), "day");
}

function text(view, key) {
  switch (key) {
    case "arch":
      return [view.arch, view.firmware].filter(Boolean).join(" / ");
    case "last_seen":
      return view.last_seen ?? -1;
    default:
      return view[key] ?? "";
  }
}

function matches(view) {
  if (!query) return true;
  const words = [view.name, view.mac, view.ip, view.mac.replaceAll(":", "-")];
  return words.some((word) => word && word.toLowerCase().includes(query));
}

function ordered() {
  const rows = [...machines.values()].filter(matches);
  const position = new Map(rows.map((view, index) => [view.mac, index]));
  rows.sort((a, b) => {
    // Discovered machines stay on top whatever the sort: they are the ones waiting for a person.
    const discovered = (b.state === "discovered") - (a.state === "discovered");
    if (discovered) return discovered;
    if (sortKey) {
      const x = text(a, sortKey);
      const y = text(b, sortKey);
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
function cell(row, label, content, className) {
  const td = document.createElement("td");
  td.dataset.label = label;
  let value = content;
  if (!(content instanceof Node) && content) {
    value = document.createElement("span");
    value.textContent = content;
  }
  if (value instanceof Node) {
    if (className) value.classList.add(...className.split(" "));
    td.append(value);
  }
  row.append(td);
  return value instanceof Node ? value : td;
}

function row(view) {
  const tr = document.createElement("tr");
  tr.dataset.mac = view.mac;
  tr.dataset.state = view.state;
  cell(tr, "Name", view.name || "(discovered)", view.name ? "name" : "name unnamed");
  cell(tr, "MAC", view.mac, "mono");
  if (view.vendor) cell(tr, "Vendor", view.vendor, "vendor").title = view.vendor;
  else cell(tr, "Vendor", "");
  cell(tr, "Address", view.ip || "", "mono");
  cell(tr, "Arch / firmware", text(view, "arch"));
  const state = document.createElement("span");
  state.className = `state state-${view.state}`;
  state.textContent = view.state;
  cell(tr, "State", state);
  const seen = cell(tr, "Last seen", view.last_seen ? ago(view.last_seen) : "never");
  if (view.last_seen) {
    seen.title = new Date(view.last_seen * 1000).toLocaleString();
    seen.classList.add("when");
  }
  return tr;
}

function draw() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    const rows = ordered();
    $("rows").replaceChildren(...rows.map(row));
    const total = machines.size;
    $("count").textContent = rows.length === total ? `(${total})` : `(${rows.length} of ${total})`;
    $("empty").hidden = total > 0;
  });
}

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

function setup() {
  setupSorting();
  $("search").addEventListener("input", (event) => {
    query = event.target.value.trim().toLowerCase();
    draw();
  });
  setInterval(draw, 30_000); // keeps "2 minutes ago" true
  subscribe();
}

setup();
