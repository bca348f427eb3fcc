// Talking to the agent's API: JSON reads, the Link header's next page, and actions. Every action
// (POST, DELETE) carries X-Pixiebox-CSRF: 1 and the session cookie (same origin only): the agent
// accepts a cookie only with that header, which a form or an image on another site cannot send.
// A refusal becomes an ApiError holding the API's own sentence and problems, which the page
// shows as they are (they name the key, MAC or address and what to do).

export const API = "/api/v1";

export class ApiError extends Error {
  constructor(status, sentence, problems = []) {
    super(sentence);
    this.status = status;
    this.problems = problems;
  }
}

export function nextLink(header) {
  // RFC 8288: <url>; rel="next"
  for (const part of (header || "").split(",")) {
    const match = part.match(/<([^>]*)>\s*;\s*rel="?next"?/);
    if (match) return match[1];
  }
  return "";
}

async function refusal(answer, what) {
  let body = {};
  try {
    body = await answer.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  const sentence = typeof body.error === "string" && body.error
    ? body.error
    : `${what} answered ${answer.status} ${answer.statusText}`.trim();
  const problems = Array.isArray(body.problems) ? body.problems.map(String) : [];
  return new ApiError(answer.status, sentence, problems);
}

/** GET a JSON document: { data, next } (next: the Link header's next page, or ""). */
export async function get(url) {
  let answer;
  try {
    answer = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  } catch {
    throw new ApiError(0, "cannot reach the agent (is it running?)");
  }
  if (!answer.ok) throw await refusal(answer, url);
  return { data: await answer.json(), next: nextLink(answer.headers.get("Link")) };
}

export async function getJSON(url) {
  return (await get(url)).data;
}

/** Every page of a paged listing, in order. */
export async function getAll(url) {
  const all = [];
  let next = url;
  while (next) {
    const page = await get(next);
    all.push(...page.data);
    next = page.next;
  }
  return all;
}

/** An action: POST or DELETE with a JSON body; the answer's JSON, or an ApiError. */
export async function send(method, url, body) {
  const headers = { Accept: "application/json", "X-Pixiebox-CSRF": "1" };
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let answer;
  try {
    answer = await fetch(url, init);
  } catch {
    throw new ApiError(0, "cannot reach the agent (is it running?)");
  }
  if (!answer.ok) throw await refusal(answer, url);
  return answer.json();
}

export function machinePath(mac, tail = "") {
  return `${API}/machines/${encodeURIComponent(mac)}${tail}`;
}
