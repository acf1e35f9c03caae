// Shared by the pages: the API key (kept in this tab's sessionStorage) and /v1 calls.

const KEY_ITEM = "omnet.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

/** The X-API-Key header when a key was entered (none in open mode). */
export function keyHeaders() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

/** An API error: HTTP status and the body's stable code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Reads the API's {"error": {code, message}} body of a failed response. */
export async function errorOf(response) {
  let code = "http_error";
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    code = body.error.code;
    message = body.error.message;
  } catch (_) {
    // not the API's JSON error body: keep the HTTP status
  }
  return new ApiError(response.status, code, message);
}

/** fetch() with the API key; throws ApiError unless the answer is 2xx. */
export async function api(path, options = {}) {
  const headers = { ...keyHeaders(), ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** Fetches a result with the key and saves it under ``filename``. */
export async function download(url, filename) {
  const blob = await (await api(url)).blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

/** What to tell the user about a 401. */
export function keyProblem(error, where = "on the jobs page") {
  if (error.code === "invalid_api_key") {
    return `This API key is not known: check it and enter it again ${where}.`;
  }
  return `This server needs an API key: enter yours ${where}.`;
}

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node[name] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}
