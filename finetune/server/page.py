"""The page at /: drop or pick an image, see the top-k labels with confidence bars ('unknown' when the reject rule
says so) and the model's test accuracy with its interval. Self-contained: inline CSS and JS, nothing fetched from
outside; every name from the model or the user reaches the page as text (`textContent`), never as markup."""

from __future__ import annotations

import html
import json
from typing import Any

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body{font:16px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:760px;margin:2rem auto;padding:0 1rem;color:#1d232a}
h1{font-size:1.4rem;margin:0 0 .2rem} .muted{color:#5b6570;font-size:.92rem}
#drop{display:block;margin:1.2rem 0;border:2px dashed #8a96a3;border-radius:10px;padding:1.6rem;text-align:center;cursor:pointer;background:#f7f9fb}
#drop.over{border-color:#2f6fdd;background:#eef4ff}
#result{display:none;gap:1.2rem;align-items:flex-start} #result.shown{display:flex}
#preview{max-width:240px;max-height:240px;border-radius:8px;border:1px solid #d5dbe1}
#answer{flex:1} #label{font-size:1.6rem;font-weight:650;margin:.1rem 0} #label.unknown{color:#9a5b00}
.row{display:grid;grid-template-columns:9rem 1fr 4rem;gap:.5rem;align-items:center;margin:.3rem 0}
.name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap} .pct{text-align:right;font-variant-numeric:tabular-nums}
.track{background:#e7ebef;border-radius:4px;height:.9rem} .bar{background:#2f6fdd;border-radius:4px;height:100%}
.first .bar{background:#1c8a4a} #error{color:#b3261e;font-weight:600}
</style></head>
<body>
<h1 id="title">__TITLE__</h1>
<div class="muted" id="facts">__FACTS__</div>
<label id="drop" for="file">Drop an image here, or click to pick one
<input id="file" type="file" accept="image/*" hidden></label>
<div id="status" class="muted"></div><div id="error"></div>
<div id="result"><img id="preview" alt="the image sent"><div id="answer">
<div class="muted" id="file-name"></div><div id="label"></div><div class="muted" id="note"></div><div id="bars"></div>
</div></div>
<script type="application/json" id="meta">__META__</script>
<script>
"use strict";
const META = JSON.parse(document.getElementById("meta").textContent);
const $ = (id) => document.getElementById(id);
const pct = (p) => (100 * p).toFixed(1) + "%";
function show(prediction, file) {
  $("file-name").textContent = prediction.file;
  $("label").textContent = prediction.label;
  $("label").className = prediction.unknown ? "unknown" : "";
  $("note").textContent = prediction.unknown
    ? "confidence " + pct(prediction.confidence) + " is below the reject threshold " + pct(META.reject_threshold) +
      "; the model's guess: " + prediction.top_k[0].label
    : "confidence " + pct(prediction.confidence);
  const bars = $("bars");
  bars.replaceChildren();
  prediction.top_k.forEach((entry, rank) => {
    const row = document.createElement("div"); row.className = rank === 0 ? "row first" : "row";
    const name = document.createElement("span"); name.className = "name"; name.textContent = entry.label; name.title = entry.label;
    const track = document.createElement("div"); track.className = "track";
    const bar = document.createElement("div"); bar.className = "bar"; bar.style.width = pct(entry.probability);
    track.appendChild(bar);
    const value = document.createElement("span"); value.className = "pct"; value.textContent = pct(entry.probability);
    row.append(name, track, value); bars.appendChild(row);
  });
  $("preview").src = URL.createObjectURL(file);
  $("result").className = "shown";
}
async function send(file) {
  $("error").textContent = ""; $("status").textContent = "classifying " + file.name + " ...";
  const form = new FormData(); form.append("files", file, file.name);
  try {
    const response = await fetch("predict", {method: "POST", body: form});
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || body.detail || response.statusText);
    show(body.predictions[0], file); $("status").textContent = "";
  } catch (err) {
    $("status").textContent = ""; $("error").textContent = String(err.message || err); $("result").className = "";
  }
}
$("file").addEventListener("change", (e) => { if (e.target.files.length) send(e.target.files[0]); });
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]); });
</script>
</body></html>
"""


def describe_accuracy(metrics: dict[str, Any] | None) -> str:
    """'test accuracy 94.1% (95% interval 88.2-98.0%) on 34 images', or why there is none."""
    split = (metrics or {}).get("evaluated_on", {}).get("split", "test")
    if metrics and "mean_average_precision" in metrics:
        low_high = (metrics.get("ci95") or {}).get("mean_average_precision") or [float("nan")] * 2
        return f"{split} mean average precision {metrics['mean_average_precision']:.3f} (95% interval {low_high[0]:.3f}-{low_high[1]:.3f})"
    if not metrics or "accuracy" not in metrics:
        return "no test report found for this model"
    text = f"{split} accuracy {100 * metrics['accuracy']:.1f}%"
    low_high = (metrics.get("ci95") or {}).get("accuracy")
    if low_high:
        text += f" (95% interval {100 * low_high[0]:.1f}-{100 * low_high[1]:.1f}%)"
    return text + (f" on {metrics['num_images']} images" if "num_images" in metrics else "")


def render_page(metadata: dict[str, Any]) -> str:
    """The page, with the model's facts escaped into it (HTML text, and JSON that cannot close its script tag)."""
    classes = metadata.get("class_names") or []
    facts = [describe_accuracy(metadata.get("test_metrics")), f"{len(classes)} classes", str(metadata.get("task", ""))]
    if metadata.get("reject_threshold") is not None:
        facts.append(f"answers 'unknown' below confidence {metadata['reject_threshold']:.3f}")
    meta_json = json.dumps(metadata).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (
        PAGE.replace("__TITLE__", html.escape(f"finetune: {metadata.get('model_name')}"))
        .replace("__FACTS__", html.escape(" · ".join(facts)))
        .replace("__META__", meta_json)
    )
