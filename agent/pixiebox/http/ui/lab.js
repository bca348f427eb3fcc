// The lab (#/lab): lab up / lab down, a live chart of every machine's latest boot from power-on
// to up or joined (one row per machine, one segment per stage, on one time scale), the time to
// all-up, and a plot of each machine's time to up over its last boots. Built from
// GET /api/v1/lab/timeline and GET /api/v1/machines/{mac}/boots; SVG made with createElementNS.

import { API, getJSON, machinePath, send } from "/ui/api.js";
import { reauthorize, requireSignIn } from "/ui/auth.js";
import { duration, el, size, svg, when } from "/ui/format.js";
import { debounced, onEvent, onOpen } from "/ui/live.js";
import { STAGES } from "/ui/machine.js";

const $ = (id) => document.getElementById(id);
const LABEL = new Map(STAGES);
const WIDTH = 1000; // the timeline's viewBox width; it is stretched to the row
const BOOTS = 20; // boots per machine in the plot
const ENDED = new Set(["os.up", "os.joined", "tftp.failed", "http.failed", "machine.off"]);

let visible = false;
let timeline = null;
let ticker = 0;
let setError = () => {};

function bootEnd(boot, now) {
  if (boot.ended) return boot.ended;
  if (boot.outcome === "booting") return now;
  const last = boot.stages[boot.stages.length - 1];
  return last ? last.at : boot.started;
}

function summary(boot) {
  if (!boot) return "no boot yet";
  const last = boot.stages[boot.stages.length - 1];
  const at = last ? LABEL.get(last.stage) || last.stage : "power-on";
  switch (boot.outcome) {
    case "up":
    case "joined":
      return `${boot.outcome} in ${duration(boot.seconds_to_up)}`;
    case "failed":
      return `failed after ${at}`;
    default:
      return `booting: ${at}`;
  }
}

function bar(boot, start, span, now) {
  const chart = svg("svg", {
    viewBox: `0 0 ${WIDTH} 20`, preserveAspectRatio: "none", class: "tl-bar", role: "img",
    "aria-label": boot ? summary(boot) : "no boot yet",
  });
  chart.append(svg("rect", { x: 0, y: 0, width: WIDTH, height: 20, class: "track" }));
  if (!boot) return chart;
  const x = (t) => Math.max(0, Math.min(WIDTH, ((t - start) / span) * WIDTH));
  const end = bootEnd(boot, now);
  const stages = boot.stages;
  stages.forEach((stage, index) => {
    const until = index + 1 < stages.length ? stages[index + 1].at : end;
    const left = x(stage.at);
    const width = Math.max(3, x(until) - left);
    let kind = stage.failed ? "failed" : stage.stage;
    if (index + 1 === stages.length && boot.outcome === "booting") kind += " seg-current";
    const rect = svg("rect", { x: left, y: 2, width, height: 16, class: `seg seg-${kind}`, "data-stage": stage.stage });
    const detail = [`${LABEL.get(stage.stage) || stage.stage} at +${duration(stage.at - boot.started)}`];
    if (stage.bytes) detail.push(size(stage.bytes));
    rect.append(svg("title", {}, detail.join(", ")));
    chart.append(rect);
  });
  if (boot.outcome === "failed") {
    chart.append(svg("rect", { x: Math.min(WIDTH - 4, x(end)), y: 0, width: 4, height: 20, class: "seg seg-failed" }));
  }
  return chart;
}

function drawTimeline() {
  if (!timeline || !visible) return;
  const now = Date.now() / 1000;
  const rows = timeline.machines || [];
  const boots = rows.map((row) => row.boot).filter(Boolean);
  const start = timeline.since ?? Math.min(now, ...boots.map((boot) => boot.started));
  const end = Math.max(start + 1, ...boots.map((boot) => bootEnd(boot, now)));
  const span = end - start;
  const items = rows.map((row) => {
    const li = el("li");
    li.dataset.mac = row.mac;
    li.dataset.outcome = row.boot ? row.boot.outcome : "none";
    const name = el("a", row.name || row.mac, "name");
    name.href = `#/machines/${row.mac}`;
    li.append(name, bar(row.boot, start, span, now), el("span", summary(row.boot), "summary"));
    return li;
  });
  if (!rows.length) items.push(el("li", "No enrolled machines: enroll one from the machine list.", "muted"));
  $("timeline").replaceChildren(...items);
  if (rows.length) {
    const axis = el("li", "", "axis");
    axis.setAttribute("aria-hidden", "true");
    axis.append(el("span"), el("span", "", "ticks"), el("span"));
    const ticks = axis.querySelector(".ticks");
    ticks.append(el("span", start === Infinity ? "" : "0 s"), el("span", duration(span / 2)), el("span", duration(span)));
    $("timeline").append(axis);
  }
  const allUp = $("all-up");
  allUp.replaceChildren();
  if (timeline.all_up_seconds !== null && timeline.all_up_seconds !== undefined) {
    allUp.dataset.seconds = String(timeline.all_up_seconds);
    allUp.append(el("strong", `All up in ${duration(timeline.all_up_seconds)}`));
    if (timeline.since) allUp.append(" · round started ", when(timeline.since));
  } else {
    delete allUp.dataset.seconds;
    const booting = boots.filter((boot) => boot.outcome === "booting").length;
    const up = boots.filter((boot) => boot.outcome === "up" || boot.outcome === "joined").length;
    const total = timeline.machines.length;
    allUp.textContent = `${up} of ${total} up` + (booting ? `, ${booting} booting` : "");
    if (!boots.length) allUp.textContent = "No boots yet";
  }
  // While a machine boots its segment grows with the clock: redraw each second, not faster.
  const booting = boots.some((boot) => boot.outcome === "booting");
  if (booting && !ticker) {
    // A stalled boot sends no event: re-read every few seconds, redraw the growing bar each one.
    let second = 0;
    ticker = setInterval(() => {
      second += 1;
      if (second % 5 === 0) reread();
      else drawTimeline();
    }, 1000);
  }
  if (!booting && ticker) {
    clearInterval(ticker);
    ticker = 0;
  }
}

function drawLegend() {
  const items = STAGES.map(([id, label]) => {
    const li = el("li");
    li.append(el("span", "", `swatch seg-${id}`), label);
    return li;
  });
  const failed = el("li");
  failed.append(el("span", "", "swatch seg-failed"), "failed");
  $("legend").replaceChildren(...items, failed);
}

let plotted = []; // [{ row, boots }] last drawn, redrawn at a new width

async function loadBootTimes(rows) {
  const series = [];
  await Promise.all(rows.map(async (row, index) => {
    try {
      const boots = await getJSON(machinePath(row.mac, `/boots?limit=${BOOTS}`));
      series[index] = { row, boots };
    } catch {
      series[index] = { row, boots: [] };
    }
  }));
  plotted = series;
  drawBootTimes();
}

function drawBootTimes() {
  const series = plotted;
  const box = $("boot-times");
  const points = series.flatMap(({ boots }) => boots.filter((boot) => boot.seconds_to_up !== null && boot.seconds_to_up !== undefined));
  if (!points.length) {
    box.replaceChildren(el("p", "No finished boots yet: the plot fills in as machines come up.", "muted"));
    return;
  }
  // The drawing is as wide as its box, so its text stays the page's size on a phone too.
  const W = Math.max(280, Math.min(1100, box.clientWidth || 640));
  const H = 200;
  const left = 56;
  const bottom = 28;
  const top = 10;
  const right = 12;
  const most = Math.max(...series.map(({ boots }) => boots.length));
  const high = Math.max(...points.map((boot) => boot.seconds_to_up)) * 1.1 || 1;
  // The latest boots line up on the right: a machine with fewer boots starts later.
  const x = (index, count) => most === 1
    ? W - right - 20
    : left + 20 + ((index + (most - count)) / (most - 1)) * (W - left - right - 40);
  const y = (seconds) => H - bottom - (seconds / high) * (H - bottom - top);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot-svg", role: "img", "aria-labelledby": "boot-times-title" });
  for (const fraction of [0, 0.5, 1]) {
    const seconds = (high / 1.1) * fraction;
    chart.append(
      svg("line", { x1: left, x2: W - right, y1: y(seconds), y2: y(seconds), class: "grid" }),
      svg("text", { x: left - 6, y: y(seconds) + 4, class: "tick", "text-anchor": "end" }, duration(seconds)),
    );
  }
  chart.append(
    svg("text", { x: left, y: H - 8, class: "tick" }, most > 1 ? `${most} boots ago` : "last boot"),
    svg("text", { x: W - right, y: H - 8, class: "tick", "text-anchor": "end" }, "latest"),
  );
  const legend = el("ul", "", "legend");
  series.forEach(({ row, boots }, index) => {
    const colour = `series-${index % 8}`;
    const group = svg("g", { class: `series ${colour}`, "data-mac": row.mac });
    const marks = [];
    boots.forEach((boot, position) => {
      const cx = x(position, boots.length);
      if (boot.seconds_to_up === null || boot.seconds_to_up === undefined) {
        if (boot.outcome === "failed") {
          const cross = svg("text", { x: cx, y: top + 8, class: "fail", "text-anchor": "middle" }, "×");
          cross.append(svg("title", {}, `${row.name || row.mac}: failed boot`));
          group.append(cross);
        }
        return;
      }
      marks.push(`${cx.toFixed(1)},${y(boot.seconds_to_up).toFixed(1)}`);
      const dot = svg("circle", { cx, cy: y(boot.seconds_to_up), r: 3.5 });
      dot.append(svg("title", {}, `${row.name || row.mac}: ${boot.outcome} in ${duration(boot.seconds_to_up)} (${new Date(boot.started * 1000).toLocaleString()})`));
      group.append(dot);
    });
    if (marks.length > 1) group.prepend(svg("polyline", { points: marks.join(" ") }));
    chart.append(group);
    const li = el("li");
    li.append(el("span", "", `swatch ${colour}`), row.name || row.mac);
    legend.append(li);
  });
  box.replaceChildren(chart, legend);
}

async function load(withPlot) {
  try {
    timeline = await getJSON(`${API}/lab/timeline`);
    drawTimeline();
    if (withPlot) await loadBootTimes(timeline.machines || []);
    setError("");
  } catch (error) {
    setError(String(error.message || error));
  }
}

const reread = debounced(() => visible && load(false), 1000);
const rereadAll = debounced(() => visible && load(true), 600);

function setOutcome(state, heading, lines = []) {
  const box = $("lab-outcome");
  box.dataset.outcome = state;
  const list = el("ul");
  for (const line of lines) list.append(el("li", line));
  box.replaceChildren(el("p", heading), ...(lines.length ? [list] : []));
  box.hidden = false;
}

async function lab(action) {
  const why = `Lab ${action} powers machines ${action === "up" ? "on" : "off"}: sign in first.`;
  if (!(await requireSignIn(why))) return;
  const buttons = [$("lab-up"), $("lab-down")];
  for (const button of buttons) button.disabled = true;
  setOutcome("pending", `Lab ${action}: waiting until every machine is seen ${action === "up" ? "up" : "off"}…`);
  try {
    const report = await send("POST", `${API}/lab/${action}`, {});
    // Each machine's own sentence (it names the driver, or what to add to lab.toml), and for
    // one that did not come up, the doctor's verdict: what a person acts on.
    const lines = report.machines.map((machine) => {
      const seconds = machine.seconds !== null && machine.seconds !== undefined ? ` (${duration(machine.seconds)})` : "";
      const verdict = machine.diagnosis ? ` ${machine.diagnosis}` : "";
      return `${machine.name}: ${machine.message}${seconds}.${verdict}`.replace(/\.\.$/, ".");
    });
    const acted = report.machines.filter((machine) => machine.result !== "skipped").length;
    const want = action === "up" ? "up" : "off";
    let heading = report.ok
      ? `Lab ${action}: ${acted} machine${acted === 1 ? "" : "s"} ${want} in ${duration(report.seconds)}.`
      : `Lab ${action}: not every machine ended ${want} (${duration(report.seconds)}).`;
    let outcome = report.ok ? "done" : "failed";
    if (!acted) {
      heading = `Lab ${action}: no machine has power control, so nothing was done.`;
      outcome = "skipped";
    }
    setOutcome(outcome, heading, lines);
  } catch (error) {
    if (await reauthorize(error, why)) {
      for (const button of buttons) button.disabled = false;
      return lab(action);
    }
    setOutcome("refused", error.message, error.problems || []);
  } finally {
    for (const button of buttons) button.disabled = false;
    rereadAll();
  }
}

export const labView = {
  section: "view-lab",
  setup(showError) {
    setError = showError;
    drawLegend();
    $("lab-up").addEventListener("click", () => lab("up"));
    $("lab-down").addEventListener("click", () => lab("down"));
    onEvent((event) => {
      if (!visible || !event.mac) return;
      if (ENDED.has(event.kind)) rereadAll();
      else reread();
    });
    onOpen(() => visible && load(true));
    let width = 0;
    new ResizeObserver((entries) => {
      const now = Math.round(entries[0].contentRect.width);
      if (visible && now && now !== width && plotted.length) drawBootTimes();
      width = now;
    }).observe($("boot-times"));
  },
  show() {
    visible = true;
    document.title = "Lab · Pixiebox";
    load(true);
  },
  hide() {
    visible = false;
    if (ticker) clearInterval(ticker);
    ticker = 0;
  },
};
