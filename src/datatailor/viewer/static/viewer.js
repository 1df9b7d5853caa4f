// datatailor view: flags, filter forms that apply on change, and live updates of a run in progress.
"use strict";

function autosubmit() {
  document.querySelectorAll("select[data-autosubmit]").forEach((el) => {
    el.addEventListener("change", () => el.form.submit());
  });
}

function flagger() {
  document.querySelectorAll(".flagger").forEach((box) => {
    const state = box.querySelector(".flag-state");
    const note = box.querySelector(".flag-text");
    box.querySelectorAll(".flag-btn").forEach((button) => {
      button.addEventListener("click", async () => {
        state.textContent = "saving…";
        try {
          const reply = await fetch(`/api/run/${encodeURIComponent(box.dataset.run)}/flag`, {
            method: "POST",
            headers: { "Content-Type": "application/json", "X-Datatailor-View": "1" },
            body: JSON.stringify({ id: box.dataset.id, flag: button.dataset.flag, note: note.value }),
          });
          const body = await reply.json();
          if (!reply.ok) { state.textContent = `not saved: ${body.error}`; return; }
          box.querySelectorAll(".flag-btn").forEach((b) => b.setAttribute("aria-pressed", String(b === button && b.dataset.flag !== "clear")));
          state.textContent = body.flag.flag === "clear" ? "not flagged" : `flagged ${body.flag.flag} at ${body.flag.at}`;
        } catch (err) {
          state.textContent = `not saved: the viewer did not answer (${err})`;
        }
      });
    });
  });
}

// While a run is going (or its index is being built), poll its status and update the page in place.
function live() {
  const head = document.querySelector(".run-head");
  if (!head) return;
  const busy = () => head.dataset.status === "running" || head.dataset.indexPhase !== "ready";
  if (!busy()) return;
  const startRows = Number(head.dataset.rows || 0);
  const tick = async () => {
    let body;
    try {
      const reply = await fetch(`/api/run/${encodeURIComponent(head.dataset.run)}/status`);
      if (!reply.ok) return;
      body = await reply.json();
    } catch (err) { return; }
    document.getElementById("status-line").textContent = body.status_line;
    const idx = document.getElementById("index-state");
    if (body.index.phase === "ready") { idx.classList.add("hidden"); }
    else {
      idx.classList.remove("hidden");
      const share = document.getElementById("index-share");
      if (share) share.textContent = `${(100 * body.index.share).toFixed(1)} %`;
      const bar = idx.querySelector("progress");
      if (bar) bar.value = body.index.share;
    }
    for (const stage of body.stages) {
      const row = document.querySelector(`#stages tr[data-stage="${CSS.escape(stage.name)}"]`);
      if (!row) continue;
      const out = row.querySelector(".live-out"), fail = row.querySelector(".live-fail");
      if (out && stage.live_outputs !== null) out.textContent = stage.live_outputs.toLocaleString();
      if (fail && stage.live_failures !== null) fail.textContent = stage.live_failures.toLocaleString();
    }
    const note = document.getElementById("live-note");
    if (head.dataset.status === "running" && body.status !== "running") {
      note.classList.remove("hidden");
      note.innerHTML = "";
      note.append(`The run stopped (${body.status}). `);
      const link = document.createElement("a");
      link.href = window.location.href;
      link.textContent = "Reload to see its final files";
      note.append(link);
    } else if (body.index.rows > startRows) {
      note.classList.remove("hidden");
      note.innerHTML = "";
      note.append(`${(body.index.rows - startRows).toLocaleString()} more rows indexed since this page was loaded. `);
      const link = document.createElement("a");
      link.href = window.location.href;
      link.textContent = "Reload to see them";
      note.append(link);
    }
    head.dataset.status = body.status;
    head.dataset.indexPhase = body.index.phase;
    if (busy()) window.setTimeout(tick, 2000);
  };
  window.setTimeout(tick, 1500);
}

document.addEventListener("DOMContentLoaded", () => { autosubmit(); flagger(); live(); });
