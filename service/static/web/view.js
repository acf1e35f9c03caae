// The viewer: a finished job's segmentation over one of its input volumes (NiiVue).
import { api, download, el, keyProblem, when } from "./common.js";

const { Niivue, SHOW_RENDER, MULTIPLANAR_TYPE } = window.niivue;
const POLL_MS = 2000;
// model/preview.py's LABEL_COLOURS (ITK-SNAP's BraTS scheme); ET is 4, or 3 (BraTS 2023).
const LABELS = {
  R: [0, 255, 0, 255, 255],
  G: [0, 0, 255, 255, 255],
  B: [0, 0, 0, 0, 0],
  A: [0, 255, 255, 255, 255],
  I: [0, 1, 2, 3, 4],
  labels: ["", "NCR/NET", "edema", "enhancing", "enhancing"],
};
const REGIONS = {
  WT: "whole tumour (WT)",
  TC: "tumour core (TC)",
  ET: "enhancing tumour (ET)",
};

const $ = (id) => document.getElementById(id);
const jobId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
const base = `/v1/jobs/${encodeURIComponent(jobId)}`;
const volumes = {}; // name -> blob: URL of the fetched file
let nv = null;
let hasInput = true;

function say(text, state) {
  $("message").textContent = text;
  $("message").hidden = !text;
  if (state) document.body.dataset.state = state;
}

/** A blob: URL of an API file, fetched once with the key. */
async function volumeUrl(name, path) {
  if (!volumes[name]) {
    const blob = await (await api(path)).blob();
    volumes[name] = URL.createObjectURL(blob);
  }
  return volumes[name];
}

function opacity() {
  return Number($("opacity").value);
}

/** Puts the cross on the tumour's centre (the label map is the last volume). */
function centreOnTumour() {
  const seg = nv.volumes[nv.volumes.length - 1];
  const [, nx, ny] = seg.hdr.dims;
  let count = 0;
  const sum = [0, 0, 0];
  seg.img.forEach((value, i) => {
    if (value > 0) {
      count += 1;
      sum[0] += i % nx;
      sum[1] += Math.floor(i / nx) % ny;
      sum[2] += Math.floor(i / (nx * ny));
    }
  });
  if (!count) return;
  // The file's voxel indices -> scanner mm (its affine) -> NiiVue's fractions.
  const vox = sum.map((s) => s / count);
  const a = seg.hdr.affine;
  const mm = [0, 1, 2].map((r) => a[r][0] * vox[0] + a[r][1] * vox[1] + a[r][2] * vox[2] + a[r][3]);
  nv.scene.crosshairPos = nv.mm2frac(mm);
  nv.drawScene();
}

async function show(modality) {
  say("Loading the volumes...");
  const list = [];
  if (hasInput) {
    try {
      const url = await volumeUrl(modality, `${base}/inputs/${modality}`);
      list.push({ url, name: `${modality}.nii.gz`, colormap: "gray" });
    } catch (error) {
      if (error.status !== 404) throw error;
      hasInput = false;
      $("modality").disabled = true;
      $("message").dataset.note = `${error.message}.`;
    }
  }
  const seg = await volumeUrl("segmentation", `${base}/segmentation`);
  list.push({ url: seg, name: "segmentation.nii.gz", opacity: hasInput ? opacity() : 1 });
  await nv.loadVolumes(list);
  const labels = nv.volumes[nv.volumes.length - 1];
  labels.setColormapLabel(LABELS);
  nv.updateGLVolume();
  centreOnTumour();
  say($("message").dataset.note || "", "ready");
}

function fillVolumes(metrics) {
  const rows = Object.entries(REGIONS)
    .filter(([region]) => metrics.volumes_ml && region in metrics.volumes_ml)
    .map(([region, name]) =>
      el("tr", {}, el("th", { textContent: name }),
        el("td", { textContent: `${metrics.volumes_ml[region].toFixed(1)} ml` })));
  $("volumes").tBodies[0].replaceChildren(...rows);
}

function fillQuality(status) {
  const quality = status.quality;
  const text = !quality
    ? "No quality report for this job."
    : quality.review_recommended
      ? `Review recommended (${quality.flags.join(", ")}).`
      : "No sign of a failed segmentation.";
  $("quality").textContent = text;
  $("quality").className = quality && quality.review_recommended ? "warn" : "";
  // The status's warnings repeat the quality notes ("review recommended: <note>").
  const notes = ((quality && quality.notes) || []).filter(
    (note) => !status.warnings.some((warning) => warning.includes(note)),
  );
  const lines = [...notes, ...status.warnings];
  $("warnings").replaceChildren(...lines.map((line) => el("li", { textContent: line })));
}

function fillDownloads(status) {
  const links = status.links;
  const items = [
    [links.segmentation, "segmentation (NIfTI)", `${jobId}_seg.nii.gz`],
    [links.dicom_seg, "segmentation (DICOM SEG)", `${jobId}_seg.dcm`],
    [links.metrics, "metrics (JSON)", `${jobId}_metrics.json`],
    [links.preview, "preview (PNG)", `${jobId}_preview.png`],
    [links.dicom_preview, "preview (DICOM)", `${jobId}_preview.dcm`],
    [links.probabilities, "probabilities (NIfTI)", `${jobId}_probabilities.nii.gz`],
  ].filter(([url]) => url);
  $("downloads").replaceChildren(
    ...items.map(([url, label, filename]) =>
      el("li", {}, el("button", {
        type: "button",
        textContent: label,
        dataset: { download: filename },
        onclick: async () => {
          $("download-status").textContent = "";
          try {
            await download(new URL(url).pathname + new URL(url).search, filename);
          } catch (error) {
            $("download-status").textContent = `${label}: ${error.message}`;
          }
        },
      }))),
  );
}

async function open(status) {
  $("result").hidden = false;
  fillVolumes(status.metrics || {});
  fillQuality(status);
  fillDownloads(status);
  nv = new Niivue({
    backColor: [0, 0, 0, 1],
    crosshairColor: [0.3, 0.6, 1, 0.8],
    crosshairWidth: 1,
    isColorbar: false,
    dragAndDropEnabled: false,
    isRadiologicalConvention: true, // as model/preview.py: the patient's left on the right
    sagittalNoseLeft: true,
    multiplanarShowRender: SHOW_RENDER.NEVER,
    multiplanarLayout: MULTIPLANAR_TYPE.ROW,
    loadingText: "",
  });
  await nv.attachToCanvas($("gl"));
  window.omnetViewer = nv; // for the browser's console and the tests
  nv.setSliceType(nv.sliceTypeMultiplanar);
  nv.onLocationChange = (where) => {
    $("location").textContent = where.string || "";
  };
  $("modality").addEventListener("change", (event) => {
    show(event.target.value).catch(failed);
  });
  $("opacity").addEventListener("input", () => {
    if (hasInput && nv.volumes.length > 1) nv.setOpacity(1, opacity());
  });
  await show($("modality").value);
}

function failed(error) {
  if (error.status === 401) say(keyProblem(error), "needs-key");
  else say(`The job could not be shown: ${error.message}`, "error");
}

async function load() {
  $("job-id").textContent = jobId;
  let status;
  try {
    status = await (await api(base)).json();
  } catch (error) {
    if (error.status === 404) {
      say(`Job ${jobId} was not found for this API key: it belongs to another key, was ` +
        "deleted, or has expired.", "not-found");
      return;
    }
    throw error;
  }
  $("job-state").textContent = status.state;
  $("job-state").className = `state state-${status.state}`;
  if (status.state === "succeeded") {
    await open(status);
    return;
  }
  if (status.state === "queued" || status.state === "running") {
    const where = status.stage ? `: ${status.stage}` : "";
    say(`This job is ${status.state}${where} (${Math.round(100 * status.progress)}%); ` +
      "the viewer opens when it has succeeded.", "waiting");
    setTimeout(() => load().catch(failed), POLL_MS);
    return;
  }
  const why = status.error ? `: ${status.error.message}` : "";
  say(`This job ${status.state} ${when(status.finished_at)}${why}; it has no result to show.`,
    "no-result");
}

load().catch(failed);
