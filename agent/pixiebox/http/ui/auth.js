// Sign-in for actions. Reads need none; enroll, power and lab up/down do. The API token is sent
// once, to POST /api/v1/session, which answers with an HttpOnly, SameSite=Strict cookie: the
// page never keeps the token (not in storage, not in a variable after the request), so a script
// that got into the page could not read it back.

import { API, ApiError, getJSON, send } from "/ui/api.js";

const $ = (id) => document.getElementById(id);
let signedIn = false;
let waiting = []; // resolvers of requireSignIn calls while the form is open

function show(state) {
  signedIn = state;
  document.documentElement.dataset.signedIn = String(state);
  $("signin").hidden = state;
  $("signout").hidden = !state;
}

export function isSignedIn() {
  return signedIn;
}

function settle(result) {
  const resolvers = waiting;
  waiting = [];
  for (const resolve of resolvers) resolve(result);
}

function open(why) {
  const dialog = $("signin-dialog");
  const form = $("signin-form");
  $("signin-why").textContent = why || "";
  $("signin-why").hidden = !why;
  $("signin-error").hidden = true;
  $("signin-error").textContent = "";
  form.elements.token.value = "";
  if (!dialog.open) dialog.showModal();
  form.elements.token.focus();
}

/**
 * Resolves true once signed in: at once when already, else after the sign-in form (opened with
 * `why`, the sentence saying what needs it) succeeds; false if the person cancels it.
 */
export function requireSignIn(why) {
  if (signedIn) return Promise.resolve(true);
  return new Promise((resolve) => {
    waiting.push(resolve);
    open(why);
  });
}

/**
 * After an action was refused: 401/403 means the session is gone (signed out elsewhere, agent
 * restarted with another token): ask again, saying why. True when the caller may retry.
 */
export async function reauthorize(error, why) {
  if (!(error instanceof ApiError) || (error.status !== 401 && error.status !== 403)) return false;
  show(false);
  return requireSignIn(`${why} ${error.message}`);
}

async function submit(event) {
  event.preventDefault();
  const form = $("signin-form");
  const error = $("signin-error");
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    await send("POST", `${API}/session`, { token: form.elements.token.value });
    form.elements.token.value = "";
    show(true);
    $("signin-dialog").close("signed-in");
    settle(true);
  } catch (refused) {
    // Only the API's sentence changes: the page stays as it was, signed out.
    error.textContent = refused.message;
    error.hidden = false;
    form.elements.token.select();
  } finally {
    button.disabled = false;
  }
}

async function signOut() {
  try {
    await send("DELETE", `${API}/session`);
  } catch {
    // the cookie is dropped below either way; the agent revokes it when it answers
  }
  show(false);
  $("signin").focus();
}

export async function setupAuth() {
  $("signin").addEventListener("click", () => open(""));
  $("signout").addEventListener("click", signOut);
  $("signin-form").addEventListener("submit", submit);
  $("signin-dialog").addEventListener("close", () => {
    $("signin-form").elements.token.value = "";
    settle(signedIn);
  });
  for (const button of document.querySelectorAll("dialog [data-close]")) {
    button.addEventListener("click", () => button.closest("dialog").close());
  }
  try {
    show(Boolean((await getJSON(`${API}/session`)).signed_in));
  } catch {
    show(false);
  }
}
