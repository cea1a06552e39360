/* pacs-triage worklist page: plain JavaScript, no build step, no third-party code.

   Everything shown comes from the HTTP API (README, "HTTP API"): GET /v1/worklist (polled every few
   seconds: EventSource cannot send an Authorization header), GET /v1/studies/{uid}/result, .../audit,
   .../preview.png (fetched and shown through a blob: URL so the bearer token goes with it) and
   POST .../acknowledge. The token is asked for only when the API answers 401, and kept in sessionStorage
   (this tab only; never in a URL). Data reaches the page through textContent, never as HTML. */

"use strict";

(() => {
  const TOKEN_KEY = "pacs-triage.token";
  const NAME_KEY = "pacs-triage.reader-name";
  const POLL_MS = 5000;
  const POLL_HIDDEN_MS = 30000;
  const TICK_MS = 15000;
  const PRIORITIES = ["stat", "urgent", "routine"];
  const TITLE = document.title;
  const EVENT_NAMES = {
    flagged: "Flagged",
    raised: "Priority raised",
    rerun_lower: "Re-run asked for less (kept)",
    unchanged: "Re-run, priority unchanged",
    acknowledged: "Acknowledged",
    notified: "Notified",
    notify_failed: "Notification failed",
    escalated: "Escalated",
    feedback: "Feedback",
  };

  const $ = (id) => document.getElementById(id);

  const state = {
    status: "open",
    entries: [],
    fetchedAt: 0, // performance.now() when the entries arrived: waiting times tick from there
    seen: null, // study UIDs of the previous poll; null right after load or a filter change
    selected: null, // study UID in the study view
    entry: null, // its worklist entry
    resultId: null, // result shown in the study view
    imageUrl: null, // blob: URL of the preview PNG
    heatmap: false, // the study view shows heatmap.png (toggle) instead of preview.png
    generation: 0, // bumps on every study opened: late answers for an older one are dropped
    timer: null,
    polling: false,
    pollAgain: false,
    needsToken: false,
    signature: "", // of the rendered entries, less waiting times
  };

  class AuthRequired extends Error {}

  // ---------------------------------------------------------------- helpers

  function el(tag, options = {}, ...children) {
    const node = document.createElement(tag);
    if (options.className) node.className = options.className;
    if (options.text !== undefined) node.textContent = options.text;
    if (options.title) node.title = options.title;
    for (const [name, value] of Object.entries(options.attrs || {})) node.setAttribute(name, value);
    node.append(...children);
    return node;
  }

  function parseTime(iso) {
    if (!iso) return null;
    // The API sends UTC; a value without a zone designator is UTC too, not local time.
    return new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(iso) ? iso : `${iso}Z`);
  }

  const pad = (n) => String(n).padStart(2, "0");

  function clock(date) {
    if (!date) return "—";
    const time = `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
    const today = new Date();
    if (date.toDateString() === today.toDateString()) return time;
    return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${time}`;
  }

  function waitText(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
    const minutes = Math.floor(seconds / 60);
    if (minutes < 1) return "< 1 min";
    if (minutes < 60) return `${minutes} min`;
    const hours = Math.floor(minutes / 60);
    if (hours < 24) return `${hours} h ${pad(minutes % 60)} min`;
    return `${Math.floor(hours / 24)} d ${hours % 24} h`;
  }

  function secondsText(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  }

  const percent = (p) => `${Math.round(p * 100)}%`;

  function waitingNow(entry) {
    if (entry.acknowledged_at) {
      const acked = parseTime(entry.acknowledged_at);
      const received = parseTime(entry.first_received);
      return (acked - received) / 1000;
    }
    return entry.waiting_seconds + (performance.now() - state.fetchedAt) / 1000;
  }

  function accessionText(entry) {
    return entry && entry.accession_number ? entry.accession_number : "no accession number";
  }

  function badge(priority) {
    return el("span", { className: `badge ${priority}`, text: priority.toUpperCase() });
  }

  function setLive(kind, text) {
    $("live").dataset.state = kind;
    $("live-text").textContent = text;
  }

  function announce(text) {
    const node = $("announcer");
    node.textContent = "";
    window.setTimeout(() => {
      node.textContent = text;
    }, 50);
  }

  // ---------------------------------------------------------------- API and token

  function token() {
    try {
      return window.sessionStorage.getItem(TOKEN_KEY);
    } catch {
      return null;
    }
  }

  async function api(path, init = {}) {
    const headers = new Headers(init.headers || {});
    const current = token();
    if (current) headers.set("Authorization", `Bearer ${current}`);
    const response = await fetch(path, { ...init, headers, cache: "no-store", credentials: "omit" });
    if (response.status === 401) {
      requireToken(current ? "That token was not accepted. Check it and try again." : "");
      throw new AuthRequired("token needed");
    }
    return response;
  }

  async function problemDetail(response) {
    try {
      const body = await response.json();
      return body.detail || body.title || `HTTP ${response.status}`;
    } catch {
      return `HTTP ${response.status}`;
    }
  }

  function requireToken(message) {
    if (token()) window.sessionStorage.removeItem(TOKEN_KEY);
    const first = !state.needsToken;
    state.needsToken = true;
    window.clearTimeout(state.timer);
    document.body.classList.add("needs-token");
    $("auth").hidden = false;
    $("forget-token").hidden = true;
    $("auth-error").textContent = message;
    setLive("error", "API token needed");
    if (first) $("token-input").focus();
  }

  function useToken(event) {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) {
      $("auth-error").textContent = "Enter the token you were given.";
      return;
    }
    window.sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    $("auth-error").textContent = "";
    $("auth").hidden = true;
    $("forget-token").hidden = false;
    document.body.classList.remove("needs-token");
    state.needsToken = false;
    setLive("connecting", "Connecting…");
    refresh();
    if (state.selected) openStudy(state.selected, { focus: false });
  }

  function forgetToken() {
    window.sessionStorage.removeItem(TOKEN_KEY);
    closeStudy();
    state.entries = [];
    state.signature = "";
    renderList(new Set());
    refresh();
  }

  // ---------------------------------------------------------------- worklist

  function schedule() {
    window.clearTimeout(state.timer);
    if (state.needsToken) return;
    state.timer = window.setTimeout(refresh, document.hidden ? POLL_HIDDEN_MS : POLL_MS);
  }

  async function refresh() {
    if (state.polling) {
      state.pollAgain = true;
      return;
    }
    window.clearTimeout(state.timer);
    state.polling = true;
    try {
      const response = await api(`/v1/worklist?status=${encodeURIComponent(state.status)}`);
      if (!response.ok) throw new Error(await problemDetail(response));
      const body = await response.json();
      applyEntries(body.entries);
      setLive("live", `Live · updated ${clock(new Date())}`);
    } catch (error) {
      if (!(error instanceof AuthRequired)) {
        setLive("error", `Cannot reach the service: retrying (${error.message})`);
      }
    } finally {
      state.polling = false;
      if (state.pollAgain) {
        state.pollAgain = false;
        refresh();
      } else {
        schedule();
      }
    }
  }

  function applyEntries(entries) {
    const fresh = new Set();
    if (state.seen !== null) {
      for (const entry of entries) {
        if (!state.seen.has(entry.study_uid)) {
          fresh.add(entry.study_uid);
          if (entry.priority === "stat" && !entry.acknowledged_at) {
            announce(`New STAT study: accession ${accessionText(entry)}`);
          }
        }
      }
    }
    state.seen = new Set(entries.map((e) => e.study_uid));
    state.entries = entries;
    state.fetchedAt = performance.now();
    // Rebuild the rows only when something but the waiting time changed: a steady list keeps its DOM
    // (hover, focus, a text selection); waiting times tick in place.
    const signature = JSON.stringify([state.status, entries.map((e) => ({ ...e, waiting_seconds: 0 }))]);
    if (signature !== state.signature || fresh.size) {
      state.signature = signature;
      renderList(fresh);
    } else {
      tick();
    }

    const stat = entries.filter((e) => e.priority === "stat" && !e.acknowledged_at).length;
    document.title = stat ? `(${stat} STAT) ${TITLE}` : TITLE;

    if (state.selected) {
      const entry = entries.find((e) => e.study_uid === state.selected);
      if (entry) {
        const rerun = entry.result_id && entry.result_id !== state.resultId;
        state.entry = entry;
        if (rerun) openStudy(entry.study_uid, { focus: false });
        else renderFacts();
      }
    }
  }

  function findingsCell(entry) {
    const cell = el("td");
    if (!entry.result_status) {
      cell.append(el("span", { className: "muted", text: "Analysing…" }));
    } else if (entry.positive_findings.length) {
      const list = el("ul", { className: "finding-list" });
      const ranked = [...entry.positive_findings].sort(
        (a, b) => PRIORITIES.indexOf(a.urgency) - PRIORITIES.indexOf(b.urgency) || b.probability - a.probability,
      );
      for (const f of ranked) {
        list.append(
          el(
            "li",
            { className: `finding-chip ${f.urgency}`, title: `${f.model}: probability ${f.probability.toFixed(3)}` },
            el("b", { text: f.label }),
            el("span", { className: "pct", text: percent(f.probability) }),
            ...(f.volume_ml == null ? [] : [el("span", { className: "size", text: sizeText(f.volume_ml, f.max_axial_diameter_mm) })]),
          ),
        );
      }
      cell.append(list);
    } else if (entry.result_status === "not_analysed") {
      cell.append(el("span", { className: "muted", text: "Not analysed" }));
    } else if (entry.result_status === "failed") {
      cell.append(el("span", { className: "muted", text: "Analysis failed" }));
    } else {
      cell.append(el("span", { className: "muted", text: "No positive finding" }));
    }
    return cell;
  }

  function stateCell(entry) {
    if (entry.acknowledged_at) {
      return el("td", {}, el("span", {
        className: "state acked",
        text: `✓ ${entry.acknowledged_by || "acknowledged"}`,
        title: `Acknowledged ${clock(parseTime(entry.acknowledged_at))}`,
      }));
    }
    const names = {
      complete: "Result ready",
      partial: "Partial result",
      not_analysed: "Not analysed",
      failed: "Failed",
    };
    const text = names[entry.result_status] || "Analysing";
    return el("td", {}, el("span", { className: `state ${entry.result_status || ""}`, text }));
  }

  function row(entry, fresh) {
    const classes = [entry.priority];
    if (entry.acknowledged_at) classes.push("acknowledged");
    if (fresh) classes.push("fresh");
    if (entry.study_uid === state.selected) classes.push("selected");
    const tr = el("tr", { className: classes.join(" ") });
    tr.dataset.uid = entry.study_uid;

    const prio = el("td", {}, badge(entry.priority));
    if (entry.promoted) {
      prio.append(el("span", { className: "promoted", text: "waiting too long", title: "Routine study promoted by waiting time" }));
    }

    const open = el("button", {
      className: "open-study",
      text: entry.accession_number || "No accession",
      attrs: {
        type: "button",
        "aria-label": `Open study, accession ${accessionText(entry)}, ${entry.priority}`,
      },
    });
    if (entry.study_uid === state.selected) open.setAttribute("aria-current", "true");
    const acc = el("td", {}, open, el("span", { className: "uid-tail", text: `…${entry.study_uid.slice(-16)}`, title: entry.study_uid }));

    const waiting = el("td", { className: "num", text: waitText(waitingNow(entry)) });
    waiting.dataset.wait = "1";
    tr.append(
      prio,
      acc,
      findingsCell(entry),
      waiting,
      el("td", { className: "num col-ttf", text: secondsText(entry.time_to_flag_seconds) }),
      stateCell(entry),
    );
    return tr;
  }

  function renderList(fresh) {
    const active = document.activeElement;
    const focusedUid = active && active.closest ? active.closest("tr[data-uid]")?.dataset.uid : null;
    const body = $("worklist-body");
    body.replaceChildren(...state.entries.map((e) => row(e, fresh.has(e.study_uid))));
    if (focusedUid) {
      const again = body.querySelector(`tr[data-uid="${CSS.escape(focusedUid)}"] .open-study`);
      if (again) again.focus({ preventScroll: true });
    }

    const empty = $("list-empty");
    empty.hidden = state.entries.length > 0;
    empty.textContent = {
      open: "No open studies: nothing is waiting for acknowledgement.",
      acknowledged: "No acknowledged studies.",
      all: "No studies yet.",
    }[state.status];

    const counts = $("counts");
    counts.replaceChildren(
      ...PRIORITIES.map((p) => {
        const n = state.entries.filter((e) => e.priority === p).length;
        return el("li", { className: n ? "" : "zero" }, badge(p), el("span", { text: String(n) }));
      }),
    );
  }

  function tick() {
    for (const tr of $("worklist-body").querySelectorAll("tr[data-uid]")) {
      const entry = state.entries.find((e) => e.study_uid === tr.dataset.uid);
      const cell = tr.querySelector("td[data-wait]");
      if (entry && cell) cell.textContent = waitText(waitingNow(entry));
    }
    if (state.entry) $("sv-waiting").textContent = waitText(waitingNow(state.entry));
  }

  function setFilter(status) {
    state.status = status;
    state.seen = null;
    for (const button of document.querySelectorAll(".filters button")) {
      button.setAttribute("aria-pressed", String(button.dataset.status === status));
    }
    refresh();
  }

  function onListKey(event) {
    const tr = event.target.closest("tr[data-uid]");
    if (!tr) return;
    let target = null;
    if (event.key === "ArrowDown") target = tr.nextElementSibling;
    else if (event.key === "ArrowUp") target = tr.previousElementSibling;
    else if (event.key === "Home") target = tr.parentElement.firstElementChild;
    else if (event.key === "End") target = tr.parentElement.lastElementChild;
    else return;
    event.preventDefault();
    if (target) target.querySelector(".open-study").focus();
  }

  function onListClick(event) {
    const tr = event.target.closest("tr[data-uid]");
    if (!tr) return;
    openStudy(tr.dataset.uid, { focus: event.target.closest(".open-study") !== null && event.detail === 0 });
  }

  // ---------------------------------------------------------------- study view

  function markSelected() {
    for (const tr of $("worklist-body").querySelectorAll("tr[data-uid]")) {
      const selected = tr.dataset.uid === state.selected;
      tr.classList.toggle("selected", selected);
      const button = tr.querySelector(".open-study");
      if (selected) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
  }

  function renderFacts() {
    const entry = state.entry;
    if (!entry) return;
    const head = $("sv-badge");
    head.className = `badge ${entry.priority}`;
    head.textContent = entry.priority.toUpperCase();
    $("sv-accession").textContent = accessionText(entry);
    $("sv-uid").textContent = entry.study_uid;
    $("sv-received").textContent = clock(parseTime(entry.first_received));
    $("sv-waiting").textContent = waitText(waitingNow(entry));
    $("sv-ttf").textContent = secondsText(entry.time_to_flag_seconds);
    renderAcknowledgement();
  }

  function renderAcknowledgement() {
    const entry = state.entry;
    const done = $("ack-done");
    const form = $("ack-form");
    if (entry && entry.acknowledged_at) {
      done.hidden = false;
      done.textContent = `✓ Acknowledged by ${entry.acknowledged_by || "someone"} at ${clock(parseTime(entry.acknowledged_at))}`;
      form.hidden = true;
    } else {
      done.hidden = true;
      form.hidden = !entry;
    }
  }

  function setImageMessage(text) {
    const img = $("sv-image");
    img.hidden = true;
    img.removeAttribute("src");
    const msg = $("sv-image-msg");
    msg.hidden = false;
    msg.textContent = text;
  }

  function dropImage() {
    if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
    state.imageUrl = null;
  }

  async function loadImage(uid, generation) {
    setImageMessage(state.heatmap ? "Loading the heat map…" : "Loading the key image…");
    const picture = state.heatmap ? "heatmap.png" : "preview.png";
    const response = await api(`/v1/studies/${encodeURIComponent(uid)}/${picture}`, { headers: { Accept: "image/png" } });
    if (generation !== state.generation) return;
    if (response.status === 200) {
      const blob = await response.blob();
      if (generation !== state.generation) return;
      dropImage();
      state.imageUrl = URL.createObjectURL(blob);
      const img = $("sv-image");
      img.src = state.imageUrl;
      try {
        await img.decode();
      } catch {
        setImageMessage("The key image could not be shown.");
        return;
      }
      if (generation !== state.generation) return;
      img.hidden = false;
      $("sv-image-msg").hidden = true;
    } else if (response.status === 202) {
      setImageMessage("The study is being analysed; the key image comes with the result.");
    } else {
      setImageMessage(`No key image: ${await problemDetail(response)}`);
    }
  }

  function probabilityCell(finding) {
    const fill = el("span", { className: `prob-fill ${finding.positive ? "positive" : ""} ${finding.urgency}` });
    fill.style.width = `${Math.max(0, Math.min(1, finding.probability)) * 100}%`;
    const tick = el("span", { className: "prob-threshold", title: `threshold ${percent(finding.threshold)}` });
    tick.style.left = `calc(${finding.threshold * 100}% - 1px)`;
    const bar = el("span", {
      className: "prob-bar",
      attrs: { role: "img", "aria-label": `probability ${percent(finding.probability)}, threshold ${percent(finding.threshold)}` },
    }, fill, tick);
    return el("td", {}, el("span", { className: "prob" }, bar, el("span", { className: "prob-value", text: percent(finding.probability) })));
  }

  // Volume and largest axial diameter of a measured finding (segmentation model), e.g. "12.4 mL · 38 mm".
  function sizeText(volumeMl, diameterMm) {
    return `${volumeMl.toFixed(1)} mL · ${Math.round(diameterMm)} mm`;
  }

  function measurements(f) {
    return (f.segments || []).map((s) => {
      const lesions = s.lesions.length === 1 ? "1 lesion" : `${s.lesions.length} lesions`;
      return el("div", {
        className: "size",
        text: `${sizeText(s.volume_ml, s.max_axial_diameter_mm)} (${lesions})`,
        title: `${s.model} ${s.model_version}: ` + s.lesions.map((l, i) => `lesion ${i + 1}: ${l.volume_ml.toFixed(2)} mL, ${l.max_axial_diameter_mm.toFixed(1)} mm`).join("; "),
      });
    });
  }

  // Feedback per finding (POST /v1/studies/{uid}/feedback, audited under the caller): agree, disagree or
  // unsure. The answer is shown on the pressed button; the per-model PPV is in GET /v1/models/{name}/stats.
  const VERDICTS = ["agree", "disagree", "unsure"];

  function verdictCell(finding) {
    const uid = state.selected;
    const status = el("span", { className: "muted verdict-status" });
    const buttons = VERDICTS.map((verdict) => {
      const button = el("button", {
        className: "verdict",
        text: verdict,
        attrs: { type: "button", "aria-pressed": "false", "aria-label": `${verdict}: ${finding.label}` },
      });
      button.addEventListener("click", async () => {
        buttons.forEach((b) => (b.disabled = true));
        const by = $("ack-by").value.trim();
        const body = { model: finding.model, label: finding.label, verdict };
        if (by) body.by = by;
        try {
          const response = await api(`/v1/studies/${encodeURIComponent(uid)}/feedback`, {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify(body),
          });
          if (response.ok) {
            buttons.forEach((b) => b.setAttribute("aria-pressed", String(b === button)));
            status.textContent = " saved";
          } else {
            status.textContent = ` ${await problemDetail(response)}`;
          }
        } catch (_error) {
          status.textContent = " not saved: no answer from the service";
        } finally {
          buttons.forEach((b) => (b.disabled = false));
        }
      });
      return button;
    });
    return el("td", { className: "verdicts" }, ...buttons, status);
  }

  function renderResult(result) {
    // Positive calls first, the most urgent of them first; then by probability.
    const rank = (f) => (f.positive ? PRIORITIES.indexOf(f.urgency) : PRIORITIES.length);
    const findings = [...result.findings].sort((a, b) => rank(a) - rank(b) || b.probability - a.probability);
    const rows = findings.map((f) => {
      const call = f.positive
        ? el("span", { className: `call positive ${f.urgency}`, text: `POSITIVE · ${f.urgency.toUpperCase()}` })
        : el("span", { className: "call negative", text: "negative" });
      return el(
        "tr",
        {},
        el("td", { text: f.label, title: `${f.code.meaning} (${f.code.scheme} ${f.code.value})` }),
        probabilityCell(f),
        el("td", {}, call, ...measurements(f)),
        el("td", { className: "mono", text: `${f.model} ${f.model_version}` }),
        verdictCell(f),
      );
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { className: "muted", text: "No findings.", attrs: { colspan: "5" } })));
    }
    $("sv-findings").replaceChildren(...rows);
    // The heat-map toggle only for a result that has one (a positive finding of a model with a cam output).
    const hasHeatmap = result.findings.some((f) => f.positive && f.heatmap);
    $("sv-heat-toggle").hidden = !hasHeatmap;
    if (!hasHeatmap && state.heatmap) {
      state.heatmap = false;
      $("sv-heat").checked = false;
      loadImage(state.selected, state.generation);
    }
    $("sv-not-analysed").replaceChildren(...result.not_analysed.map((n) => el("li", { text: n.reason })));

    const models = result.models.map((m) =>
      el(
        "tr",
        {},
        el("td", { text: m.name, title: modelNote(m.name) }),
        el(
          "td",
          { className: "mono", title: `${m.code_version || "pacs-triage"} · ${(m.input_instances || []).length} input instance(s)` },
          m.version,
          m.card_version ? el("small", { className: "muted", text: ` · card v${m.card_version} · preprocessing v${m.preprocessing_version}` }) : "",
        ),
        el("td", { text: m.provider.replace(/ExecutionProvider$/, "") }),
        el("td", { className: "mono", text: `${m.sha256.slice(0, 12)}…`, title: m.sha256 }),
      ),
    );
    if (!models.length) {
      models.push(el("tr", {}, el("td", { className: "muted", text: "No model ran on this study.", attrs: { colspan: "4" } })));
    }
    $("sv-models").replaceChildren(...models);

    const positives = findings.filter((f) => f.positive).map((f) => `${f.label} ${percent(f.probability)}`);
    const overlay = state.heatmap ? "the AI heat map" : "AI boxes";
    $("sv-image").alt = `Key image of accession ${accessionText(state.entry)} with ${overlay}${positives.length ? `: ${positives.join(", ")}` : ""}`;
    const status = { complete: "Complete", partial: "Partial", not_analysed: "Not analysed", failed: "Failed" }[result.status];
    $("sv-status").textContent = `${status || result.status} · AI priority ${result.priority}`;
  }

  // What each model's card says about it (GET /v1/models: intended use, limitations, license, ...),
  // shown as the model name's tooltip; fetched once, and the page works without it.
  let modelCards = null;
  async function loadModelCards() {
    if (modelCards) return;
    try {
      const response = await api("/v1/models");
      if (!response.ok) return;
      const body = await response.json();
      modelCards = new Map(body.models.map((m) => [m.name, m]));
    } catch (_error) {
      modelCards = null;
    }
  }

  function modelNote(name) {
    const card = modelCards && modelCards.get(name);
    if (!card) return "";
    const docs = Object.entries(card.documentation || {}).map(([k, v]) => `${k.replace(/_/g, " ")}: ${typeof v === "string" ? v : JSON.stringify(v)}`);
    return [`intended use: ${card.intended_use}`, ...docs].join("\n");
  }

  async function loadResult(uid, generation) {
    $("sv-status").textContent = "Loading…";
    await loadModelCards();
    const response = await api(`/v1/studies/${encodeURIComponent(uid)}/result`);
    if (generation !== state.generation) return;
    if (response.status === 200) {
      const result = await response.json();
      if (generation !== state.generation) return;
      state.resultId = result.result_id;
      renderResult(result);
    } else if (response.status === 202) {
      $("sv-status").textContent = "Being analysed";
      $("sv-findings").replaceChildren(el("tr", {}, el("td", { className: "muted", text: "Analysis in progress.", attrs: { colspan: "5" } })));
      $("sv-models").replaceChildren();
    } else {
      $("sv-status").textContent = await problemDetail(response);
    }
  }

  function auditDetail(event) {
    const parts = [];
    const d = event.detail || {};
    if (d.result_priority) parts.push(`result ${d.result_priority}`);
    if (d.verdict) parts.push(`${d.verdict} on ${d.model} ${d.label}`);
    if (d.note) parts.push(`“${d.note}”`);
    if (d.target) parts.push(String(d.target));
    if (d.error) parts.push(String(d.error));
    return parts.length ? ` (${parts.join(", ")})` : "";
  }

  async function loadAudit(uid, generation) {
    const response = await api(`/v1/studies/${encodeURIComponent(uid)}/audit`);
    if (generation !== state.generation || !response.ok) return;
    const body = await response.json();
    if (generation !== state.generation) return;
    const items = body.events.map((e) =>
      el(
        "li",
        {},
        `${clock(parseTime(e.at))} · ${EVENT_NAMES[e.event] || e.event} by `,
        el("span", { className: "who", text: e.actor }),
        auditDetail(e),
      ),
    );
    if (!items.length) items.push(el("li", { text: "Nothing yet." }));
    $("sv-audit").replaceChildren(...items);
  }

  async function openStudy(uid, { focus = true } = {}) {
    const generation = ++state.generation;
    const changed = uid !== state.selected;
    state.selected = uid;
    state.entry = state.entries.find((e) => e.study_uid === uid) || (changed ? null : state.entry);
    state.resultId = state.entry ? state.entry.result_id : null;
    markSelected();
    $("study-placeholder").hidden = true;
    $("study-view").hidden = false;
    if (changed) {
      state.heatmap = false;
      $("sv-heat").checked = false;
      $("sv-heat-toggle").hidden = true;
      $("ack-msg").textContent = "";
      $("ack-note").value = "";
      $("sv-findings").replaceChildren();
      $("sv-models").replaceChildren();
      $("sv-not-analysed").replaceChildren();
      $("sv-audit").replaceChildren();
    }
    renderFacts();
    if (focus) $("study-title").focus({ preventScroll: false });
    const jobs = [loadResult(uid, generation), loadImage(uid, generation), loadAudit(uid, generation)];
    for (const outcome of await Promise.allSettled(jobs)) {
      if (outcome.status === "rejected" && !(outcome.reason instanceof AuthRequired)) {
        setLive("error", `Cannot load the study: ${outcome.reason.message}`);
      }
    }
  }

  function closeStudy() {
    const uid = state.selected;
    state.generation += 1;
    state.selected = null;
    state.entry = null;
    state.resultId = null;
    dropImage();
    setImageMessage("");
    $("study-view").hidden = true;
    $("study-placeholder").hidden = false;
    markSelected();
    if (uid) {
      const button = $("worklist-body").querySelector(`tr[data-uid="${CSS.escape(uid)}"] .open-study`);
      if (button) button.focus();
    }
  }

  async function acknowledge(event) {
    event.preventDefault();
    const uid = state.selected;
    const by = $("ack-by").value.trim();
    const note = $("ack-note").value.trim();
    const msg = $("ack-msg");
    msg.dataset.kind = "";
    if (!uid) return;
    if (!by) {
      msg.dataset.kind = "error";
      msg.textContent = "Enter your name: the acknowledgement is audited under it.";
      $("ack-by").focus();
      return;
    }
    const button = $("ack-button");
    button.disabled = true;
    msg.textContent = "Acknowledging…";
    try {
      const response = await api(`/v1/studies/${encodeURIComponent(uid)}/acknowledge`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(note ? { by, note } : { by }),
      });
      if (response.ok) {
        const entry = await response.json();
        try {
          window.localStorage.setItem(NAME_KEY, by);
        } catch {
          /* storage off: the name is asked again next time */
        }
        if (state.selected === uid) {
          state.entry = entry;
          renderFacts();
          msg.textContent = "";
          loadAudit(uid, state.generation).catch(() => {});
        }
        announce(`Acknowledged accession ${accessionText(entry)}`);
        refresh();
      } else if (response.status === 403) {
        msg.dataset.kind = "error";
        msg.textContent = `Your token may not acknowledge: ${await problemDetail(response)}`;
      } else {
        msg.dataset.kind = "error";
        msg.textContent = `Not acknowledged: ${await problemDetail(response)}`;
      }
    } catch (error) {
      if (!(error instanceof AuthRequired)) {
        msg.dataset.kind = "error";
        msg.textContent = `Not acknowledged: ${error.message}`;
      } else {
        msg.textContent = "";
      }
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- start

  function start() {
    try {
      $("ack-by").value = window.localStorage.getItem(NAME_KEY) || "";
    } catch {
      /* storage off */
    }
    $("forget-token").hidden = !token();
    $("token-form").addEventListener("submit", useToken);
    $("forget-token").addEventListener("click", forgetToken);
    for (const button of document.querySelectorAll(".filters button")) {
      button.addEventListener("click", () => setFilter(button.dataset.status));
    }
    $("worklist-body").addEventListener("click", onListClick);
    $("worklist-body").addEventListener("keydown", onListKey);
    $("sv-close").addEventListener("click", closeStudy);
    $("sv-heat").addEventListener("change", (event) => {
      state.heatmap = event.target.checked;
      const img = $("sv-image");
      img.alt = state.heatmap
        ? img.alt.replace("with AI boxes", "with the AI heat map")
        : img.alt.replace("with the AI heat map", "with AI boxes");
      if (state.selected) loadImage(state.selected, state.generation);
    });
    $("ack-form").addEventListener("submit", acknowledge);
    $("study").addEventListener("keydown", (event) => {
      if (event.key === "Escape" && state.selected && event.target.tagName !== "INPUT") closeStudy();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && !state.needsToken) refresh();
    });
    window.setInterval(tick, TICK_MS);
    refresh();
  }

  start();
})();
