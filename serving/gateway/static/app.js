// Scribe's drawing page: plain JavaScript, no dependencies, served by the gateway.
"use strict";

const $ = (id) => document.getElementById(id);

// ---- Models: which versions answer, and whether each is available -------------------------
// A model not available yet (still training, say) is looked for every few seconds, and appears
// here by itself once a version is pushed; no reload needed.
// The digits ladder: "digits" is the top rung (the batch-norm CNN, what a drawing is read with);
// "digits-<rung>" are the talk's lower rungs, listed bottom-up in the model config, optional
// (`make ladder` trains them). Each available one reads every drawing too, shown side by side.
const DIGITS = "digits";
let lowerRungs = []; // available lower rungs, top first: [{rung, name, version}]

async function refreshModels() {
  let waiting = true;
  try {
    const response = await fetch("/v1/models");
    const body = await response.json();
    $("models").innerHTML = "";
    $("models").className = "";
    const lower = body.models.filter((model) => model.name.startsWith(`${DIGITS}-`)).reverse();
    const main = body.models.filter((model) => !model.name.startsWith(`${DIGITS}-`));
    for (const model of main) {
      const span = document.createElement("span");
      span.textContent = model.available
        ? `${model.name} v${model.serving_version} `
        : `${model.name}: not available yet, it appears here once a version is pushed `;
      if (!model.available) span.className = "warn";
      $("models").appendChild(span);
    }
    lowerRungs = lower.filter((model) => model.available).map((model) => ({
      rung: model.name.slice(DIGITS.length + 1), name: model.name, version: model.serving_version }));
    if (lower.length) {
      const span = document.createElement("span");
      span.dataset.testid = "ladder-models";
      const missing = lower.filter((model) => !model.available).map((model) => model.name.slice(DIGITS.length + 1));
      span.textContent = "ladder: " + [
        ...lowerRungs.map((model) => `${model.rung} v${model.version}`),
        ...(missing.length ? [`not trained yet: ${missing.join(", ")} (make ladder)`] : [])].join(", ");
      $("models").appendChild(span);
    }
    waiting = !main.every((model) => model.available);
  } catch (error) {
    $("models").textContent = "The model server cannot be reached.";
    $("models").className = "warn";
  }
  setTimeout(refreshModels, waiting ? 3000 : 10000);
}
refreshModels();

// ---- Drawing -------------------------------------------------------------------------------
const canvas = $("digit-canvas");
const pen = canvas.getContext("2d");
let drawing = false;
let predictions = 0; // answers to older strokes are ignored when a newer one is on its way

function clearCanvas() {
  predictions++; // an answer still on its way belongs to the drawing just cleared
  pen.fillStyle = "#fff";
  pen.fillRect(0, 0, canvas.width, canvas.height);
  $("digit-result").textContent = "Draw a digit above.";
  $("bars").innerHTML = "";
  $("ladder").innerHTML = "";
}

function point(event) {
  const box = canvas.getBoundingClientRect(); // the canvas may be scaled by CSS
  return [(event.clientX - box.left) * canvas.width / box.width,
          (event.clientY - box.top) * canvas.height / box.height];
}

canvas.addEventListener("pointerdown", (event) => {
  drawing = true;
  canvas.setPointerCapture(event.pointerId);
  pen.lineWidth = 18;
  pen.lineCap = pen.lineJoin = "round";
  pen.strokeStyle = "#000";
  pen.beginPath();
  pen.moveTo(...point(event));
  pen.lineTo(...point(event));
  pen.stroke();
});
canvas.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  pen.lineTo(...point(event));
  pen.stroke();
});
function endStroke() {
  if (!drawing) return;
  drawing = false;
  canvas.toBlob((blob) => predict(blob), "image/png");
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);
$("clear").addEventListener("click", clearCanvas);
$("upload").addEventListener("change", () => {
  const file = $("upload").files[0];
  if (file) predict(file);
});

// One drawing, read by a digits model (default: the top rung): the answer's JSON, or an error.
async function readDigit(blob, model) {
  const form = new FormData();
  form.append("image", blob, "drawing.png");
  const query = model ? `?model=${encodeURIComponent(model)}` : "";
  const response = await fetch(`/v1/digits/predict${query}`, { method: "POST", body: form });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : `Error ${response.status}`);
  return body;
}

async function predict(blob) {
  const mine = ++predictions;
  $("digit-result").textContent = "Reading…";
  $("ladder").innerHTML = "";
  const rungs = lowerRungs;
  // Every rung reads the drawing at once; the top rung's answer is shown as soon as it comes,
  // the ladder once every rung has answered.
  const top = readDigit(blob, null);
  const lower = Promise.allSettled(rungs.map((model) => readDigit(blob, model.rung)));
  let first;
  try {
    first = await top;
  } catch (error) {
    if (mine !== predictions) return;
    $("digit-result").textContent = error instanceof TypeError ? "The gateway cannot be reached." : error.message;
    $("bars").innerHTML = "";
    return;
  }
  if (mine !== predictions) return;
  showPrediction(first.predictions[0], first.model);
  const answers = await lower;
  if (mine !== predictions) return;
  showLadder([{ rung: "bn", answer: { status: "fulfilled", value: first } },
              ...rungs.map((model, i) => ({ rung: model.rung, answer: answers[i] }))]);
}

// Every rung's reading of the same drawing, top rung first; shown once a lower rung is trained.
function showLadder(readings) {
  const ladder = $("ladder");
  ladder.innerHTML = "";
  if (readings.length < 2) return;
  for (const { rung, answer } of readings) {
    const item = document.createElement("li");
    item.dataset.rung = rung;
    const name = document.createElement("span");
    name.className = "rung";
    name.textContent = rung;
    item.appendChild(name);
    if (answer.status === "fulfilled") {
      const prediction = answer.value.predictions[0];
      const digit = document.createElement("strong");
      digit.textContent = prediction.digit;
      item.dataset.digit = prediction.digit;
      item.append(digit, ` ${(prediction.confidence * 100).toFixed(1)}%`);
      item.title = `${answer.value.model.name} v${answer.value.model.version}`;
    } else {
      item.append(` ${answer.reason.message}`);
      item.className = "warn";
    }
    ladder.appendChild(item);
  }
}

function showPrediction(prediction, model) {
  const result = $("digit-result");
  result.innerHTML = "";
  const digit = document.createElement("strong");
  digit.textContent = prediction.digit;
  digit.dataset.digit = prediction.digit;
  result.append(digit, ` ${(prediction.confidence * 100).toFixed(1)}% sure ` +
                `(${model.name} v${model.version})`);
  result.dataset.digit = prediction.digit;
  const bars = $("bars");
  bars.innerHTML = "";
  prediction.probabilities.forEach((p, d) => {
    const item = document.createElement("li");
    if (d === prediction.digit) item.className = "best";
    const label = document.createElement("span");
    label.textContent = d;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(p * 100).toFixed(1)}%`;
    const value = document.createElement("span");
    value.textContent = `${(p * 100).toFixed(1)}%`;
    item.append(label, bar, value);
    bars.appendChild(item);
  });
}

// ---- Text generation, streamed as server-sent events over fetch ---------------------------
let controller = null;

$("text-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const output = $("generated-text");
  const status = $("text-status");
  const body = {
    prompt: $("prompt").value,
    max_chars: Number($("max-chars").value),
    temperature: Number($("temperature").value),
    stream: true,
  };
  if ($("seed").value !== "") {
    // A JavaScript number holds integers exactly up to 2^53 - 1: a larger seed would be sent
    // rounded, and would not give the text it names.
    body.seed = Number($("seed").value);
    if (!Number.isSafeInteger(body.seed) || body.seed < 0) {
      status.textContent = `The seed must be a whole number from 0 to ${Number.MAX_SAFE_INTEGER}.`;
      return;
    }
  }
  if (controller) controller.abort();
  controller = new AbortController();
  output.textContent = "";
  status.textContent = "Writing…";
  $("generate").disabled = true;
  $("stop").disabled = false;
  try {
    const response = await fetch("/v1/text/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const error = await response.json();
      status.textContent = error.error ? error.error.message : `Error ${response.status}`;
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const message = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const kind = (message.match(/^event: (.*)$/m) || [])[1];
        const data = JSON.parse((message.match(/^data: (.*)$/m) || [, "{}"])[1]);
        if (kind === "chunk") output.textContent += data.text;
        if (kind === "done") status.textContent = `Written by ${data.model.name} v${data.model.version}, seed ${data.seed}.`;
        if (kind === "error") status.textContent = data.error.message;
      }
    }
  } catch (error) {
    status.textContent = error.name === "AbortError" ? "Stopped." : "The gateway cannot be reached.";
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
});

$("stop").addEventListener("click", () => {
  if (controller) controller.abort();
});

clearCanvas();
