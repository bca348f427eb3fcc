// Settings (#/settings): lab.toml as the agent last loaded it (secret values already replaced by
// the agent, never sent to the page) with line numbers, and what `pixiebox check` says about the
// file on disk now, each finding linked to its line.

import { API, getJSON } from "/ui/api.js";
import { el, when } from "/ui/format.js";
import { debounced, onEvent, onOpen } from "/ui/live.js";

const $ = (id) => document.getElementById(id);
let visible = false;
let setError = () => {};

function drawText(text, marked) {
  const lines = text.replace(/\n$/, "").split("\n");
  const width = String(lines.length).length;
  const items = lines.map((line, index) => {
    const number = index + 1;
    const row = el("span", "", "line");
    row.id = `line-${number}`;
    if (marked.has(number)) row.dataset.severity = marked.get(number);
    const gutter = el("span", String(number).padStart(width, " "), "ln");
    gutter.setAttribute("aria-hidden", "true");
    row.append(gutter, el("span", line || " ", `code-text${/^\s*#/.test(line) ? " comment" : ""}`), "\n");
    return row;
  });
  $("labtoml").replaceChildren(...items);
}

function drawFindings(findings) {
  const items = findings.map((finding) => {
    const li = el("li");
    li.dataset.severity = finding.severity;
    li.append(el("span", finding.severity, `severity severity-${finding.severity}`), " ");
    if (finding.line) {
      const link = el("a", `line ${finding.line}`, "where");
      link.href = `#/settings`;
      link.addEventListener("click", (event) => {
        event.preventDefault();
        const line = document.getElementById(`line-${finding.line}`);
        if (line) {
          line.scrollIntoView({ block: "center" });
          line.classList.add("flash");
          setTimeout(() => line.classList.remove("flash"), 1500);
        }
      });
      li.append(link, ": ");
    }
    if (finding.key) li.append(el("code", finding.key), " ");
    li.append(el("span", finding.message));
    if (finding.hint) li.append(el("span", ` (${finding.hint})`, "hint"));
    return li;
  });
  $("findings").replaceChildren(...items);
  $("findings").hidden = !findings.length;
  $("findings-ok").hidden = findings.length > 0;
}

async function load() {
  try {
    const settings = await getJSON(`${API}/settings`);
    const findings = settings.findings || [];
    const marked = new Map();
    for (const finding of findings) {
      if (finding.line && marked.get(finding.line) !== "error") marked.set(finding.line, finding.severity);
    }
    drawText(settings.text || "", marked);
    drawFindings(findings);
    const facts = $("settings-facts");
    facts.replaceChildren(el("code", settings.path));
    if (settings.loaded_at) facts.append(" · loaded ", when(settings.loaded_at));
    setError("");
  } catch (error) {
    setError(String(error.message || error));
  }
}

// Enrolling changes lab.toml and the agent reloads it: re-read then.
const reread = debounced(() => visible && load(), 400);

export const settingsView = {
  section: "view-settings",
  setup(showError) {
    setError = showError;
    onEvent((event) => {
      if (event.kind === "machine.enrolled") reread();
    });
    onOpen(() => visible && load());
  },
  show() {
    visible = true;
    document.title = "Settings · Pixiebox";
    load();
  },
  hide() {
    visible = false;
  },
};
