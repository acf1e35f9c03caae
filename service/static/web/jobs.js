// The jobs page: API key, submission (drag and drop or file fields), live job list.
import { api, apiKey, el, errorOf, keyHeaders, keyProblem, setApiKey, when } from "./common.js";

const MODALITIES = ["t1", "t1ce", "t2", "flair"];
const FIELDS = [...MODALITIES, "study"];
const POLL_MS = 2000;
// File-name endings of each modality (BraTS 2018-2021 and 2023 names).
const ENDINGS = {
  t1ce: ["t1ce", "t1c", "t1gd"],
  flair: ["flair", "t2f"],
  t2: ["t2", "t2w"],
  t1: ["t1", "t1n", "t1w"],
};

const $ = (id) => document.getElementById(id);
const chosen = {}; // field -> File
let pollTimer = null;

/** The form field a dropped file belongs to, from its name; null if unclear. */
export function fieldOf(name) {
  const lower = name.toLowerCase();
  if (lower.endsWith(".zip")) return "study";
  const stem = lower.replace(/\.nii(\.gz|\.bz2)?$/, "");
  if (stem === lower) return null;
  for (const [field, endings] of Object.entries(ENDINGS)) {
    for (const ending of endings) {
      if (stem === ending || new RegExp(`[._-]${ending}$`).test(stem)) return field;
    }
  }
  return null;
}

function showChosen() {
  for (const field of FIELDS) {
    const input = $(`slot-${field}`);
    const file = chosen[field];
    const transfer = new DataTransfer();
    if (file) transfer.items.add(file);
    input.files = transfer.files;
  }
  const nifti = MODALITIES.filter((m) => chosen[m]).length;
  $("submit").disabled = !(nifti === 4 || (chosen.study && nifti === 0));
}

function addFiles(files) {
  const unknown = [];
  for (const file of files) {
    const field = fieldOf(file.name);
    if (field === null) unknown.push(file.name);
    else chosen[field] = file;
  }
  if (chosen.study && MODALITIES.some((m) => chosen[m])) {
    $("submit-status").textContent =
      "Send either the four NIfTI volumes or a DICOM study, not both: clear one.";
  } else if (unknown.length) {
    $("submit-status").textContent =
      `Could not tell the modality of ${unknown.join(", ")}: choose it in the fields below ` +
      "(names ending in _t1, _t1ce, _t2 or _flair are recognised).";
  } else {
    $("submit-status").textContent = "";
  }
  showChosen();
}

function clearFiles() {
  for (const field of FIELDS) delete chosen[field];
  showChosen();
  $("submit-status").textContent = "";
}

function submit() {
  const form = new FormData();
  const fields = chosen.study ? ["study"] : MODALITIES;
  for (const field of fields) form.append(field, chosen[field], chosen[field].name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/jobs");
  for (const [name, value] of Object.entries(keyHeaders())) xhr.setRequestHeader(name, value);
  const progress = $("upload-progress");
  progress.hidden = false;
  progress.value = 0;
  $("submit").disabled = true;
  $("submit-status").textContent = "Uploading...";
  xhr.upload.addEventListener("progress", (event) => {
    if (event.lengthComputable) progress.value = event.loaded / event.total;
  });
  xhr.addEventListener("load", async () => {
    progress.hidden = true;
    if (xhr.status === 202) {
      const job = JSON.parse(xhr.responseText);
      clearFiles();
      $("submit-status").textContent = `Submitted: job ${job.id}.`;
      refresh();
    } else {
      const error = await errorOf(new Response(xhr.responseText, { status: xhr.status }));
      $("submit-status").textContent = `Not submitted: ${error.message} (${error.code})`;
      showChosen();
    }
  });
  xhr.addEventListener("error", () => {
    progress.hidden = true;
    $("submit-status").textContent = "The upload failed: the server could not be reached.";
    showChosen();
  });
  xhr.send(form);
}

function jobRow(job) {
  const state = el("span", { class: `state state-${job.state}`, textContent: job.state });
  let detail = job.stage || "";
  if (job.state === "queued" && job.queue_position !== null) {
    detail = `position ${job.queue_position} in the queue`;
  }
  const hasEta = job.eta_s !== null && job.eta_s !== undefined;
  if ((job.state === "queued" || job.state === "running") && hasEta) {
    detail += ` (about ${Math.max(1, Math.round(job.eta_s))} s left)`;
  }
  if (job.error) detail = job.error.message;
  const progress = el("progress", { max: 1, value: job.progress });
  const actions =
    job.state === "succeeded"
      ? el("a", { href: `/view/${encodeURIComponent(job.id)}`, class: "view", textContent: "View" })
      : null;
  const review = job.quality && job.quality.review_recommended
    ? el("span", { class: "badge warn", textContent: "review recommended" })
    : null;
  return el(
    "tr",
    { dataset: { job: job.id, state: job.state } },
    el("td", { textContent: when(job.created_at) }),
    el("td", { class: "mono", textContent: job.id }),
    el("td", {}, state, " ", review),
    el("td", {}, progress, el("span", { class: "note", textContent: ` ${detail}` })),
    el("td", {}, actions),
  );
}

async function refresh() {
  clearTimeout(pollTimer);
  const status = $("jobs-status");
  try {
    const page = await (await api("/v1/jobs?limit=50")).json();
    $("jobs").tBodies[0].replaceChildren(...page.items.map(jobRow));
    status.textContent = page.total
      ? `${page.total} job${page.total === 1 ? "" : "s"}` +
        (page.total > page.items.length ? ` (the newest ${page.items.length} shown)` : "")
      : "No jobs yet.";
    $("key-status").textContent = apiKey()
      ? "The key is kept in this browser tab only."
      : "This server is in open mode: no key is needed.";
    document.body.dataset.state = "ready";
  } catch (error) {
    $("jobs").tBodies[0].replaceChildren();
    if (error.status === 401) {
      status.textContent = "";
      $("key-status").textContent = keyProblem(error, "above");
      document.body.dataset.state = "needs-key";
      $("key-input").focus();
      return; // nothing to poll until a key is entered
    }
    status.textContent = `The job list could not be loaded: ${error.message}`;
    document.body.dataset.state = "error";
  }
  if (!document.hidden) pollTimer = setTimeout(refresh, POLL_MS);
}

function setup() {
  $("key-input").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("key-input").value.trim());
    refresh();
  });
  $("key-forget").addEventListener("click", () => {
    setApiKey("");
    $("key-input").value = "";
    refresh();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  $("files").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = "";
  });
  for (const field of FIELDS) {
    $(`slot-${field}`).addEventListener("change", (event) => {
      if (event.target.files.length) chosen[field] = event.target.files[0];
      else delete chosen[field];
      showChosen();
    });
  }
  $("submit").addEventListener("click", submit);
  $("clear").addEventListener("click", clearFiles);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });
  refresh();
}

setup();
