// voxlens web page: microphone (+ optional camera) over WebRTC to POST /offer,
// events over the "events" data channel (docs/PROTOCOL.md). When the server needs an access
// key, the page asks for it once, keeps it, and connects with a token minted from it for each
// connection (POST /v1/tokens; PROTOCOL.md, "Access"). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// The page's words in each language it speaks. The picker's value is the session's spoken
// language (the offer's `language`; "" = Auto = detect); the labels are Chinese for "zh" and
// English otherwise.
const LABELS = {
  en: {
    language: "Language", auto: "Auto", connect: "Connect", disconnect: "Disconnect",
    mute: "Mute", unmute: "Unmute", stop: "Stop reply", stopTitle: "Stop the current reply",
    camera: "Camera", preview: "Camera preview", placeholder: "Type a message…", message: "Message",
    send: "Send", you: "You", assistant: "voxlens",
    empty: "Press Connect, allow the microphone, and talk. You can also type below.",
    latencyNone: "voice-to-voice: –",
    latency: (ms) => `voice-to-voice (server): ${ms} ms`,
    ms: (ms) => `${ms} ms`,
    nextConnect: "The new language is used from the next connection: press Disconnect, then Connect.",
    forgetKey: "Forget key", forgetKeyTitle: "Remove the access key kept in this browser",
    keyTitle: "Access key needed",
    keyHelp: "This voxlens server needs an access key. Ask the person who runs it for one; " +
      "this browser keeps it until you press “Forget key”.",
    keyLabel: "Access key", keyUse: "Connect", keyCancel: "Cancel",
    state: {
      notConnected: "not connected", connecting: "connecting…", listening: "listening",
      hearing: "listening…", thinking: "thinking…", speaking: "speaking",
      noMicrophone: "no microphone", disconnected: "disconnected",
    },
    error: {
      busy: "The assistant is busy with other people right now. Please try again in a moment.",
      not_ready: "The assistant is still starting up. Please try again in a few seconds.",
      engine_failed: "Sorry, something went wrong while answering. Please try again.",
      internal: "The assistant ran into a problem and ended the conversation. Press Connect to start again.",
      rate_limited: "That was too fast for the assistant. Please wait a moment and try again.",
      session_expired: "This conversation reached its time limit. Press Connect to start a new one.",
      idle_timeout: "The conversation ended after a long silence. Press Connect to start again.",
      draining: "The assistant is restarting. Please try again in a moment.",
      closing: "The assistant is restarting; reconnecting you…",
      micDenied: "voxlens needs your microphone. Please allow microphone access in the browser and try again.",
      noDevice: (detail) => "No microphone (or camera) could be opened: " + detail,
      lost: "The connection to the assistant was lost. Press Connect to start again.",
      unreachable: "The assistant could not be reached. Is the server running?",
      needKey: "This server needs an access key. Press Connect to enter it.",
      badKey: "The server did not accept this access key. Check it and enter it again.",
      other: (detail) => detail || "Something went wrong.",
    },
  },
  zh: {
    language: "语言", auto: "自动", connect: "连接", disconnect: "断开",
    mute: "静音", unmute: "取消静音", stop: "停止回答", stopTitle: "停止当前的回答",
    camera: "摄像头", preview: "摄像头画面", placeholder: "输入消息…", message: "消息",
    send: "发送", you: "你", assistant: "voxlens",
    empty: "按“连接”，允许使用麦克风，然后说话。也可以在下面输入文字。",
    latencyNone: "语音到语音：–",
    latency: (ms) => `语音到语音（服务器）：${ms} 毫秒`,
    ms: (ms) => `${ms} 毫秒`,
    nextConnect: "新的语言在下次连接时生效：请先按“断开”，再按“连接”。",
    forgetKey: "忘记密钥", forgetKeyTitle: "删除此浏览器保存的访问密钥",
    keyTitle: "需要访问密钥",
    keyHelp: "这个 voxlens 服务器需要访问密钥。请向管理它的人索取；此浏览器会保存密钥，直到你按“忘记密钥”。",
    keyLabel: "访问密钥", keyUse: "连接", keyCancel: "取消",
    state: {
      notConnected: "未连接", connecting: "正在连接…", listening: "正在听",
      hearing: "正在听…", thinking: "正在思考…", speaking: "正在说话",
      noMicrophone: "没有麦克风", disconnected: "已断开",
    },
    error: {
      busy: "助手正在为其他人服务，请稍后再试。",
      not_ready: "助手还在启动，请过几秒钟再试。",
      engine_failed: "抱歉，回答时出了问题，请再试一次。",
      internal: "助手出了问题，结束了这次对话。请按“连接”重新开始。",
      rate_limited: "操作太快了，请稍等片刻再试。",
      session_expired: "这次对话已达到时间上限。请按“连接”开始新的对话。",
      idle_timeout: "很长时间没有声音，对话已结束。请按“连接”重新开始。",
      draining: "助手正在重新启动，请稍后再试。",
      closing: "助手正在重新启动，正在为你重新连接…",
      micDenied: "voxlens 需要使用你的麦克风。请在浏览器中允许访问麦克风，然后再试一次。",
      noDevice: (detail) => "无法打开麦克风（或摄像头）：" + detail,
      lost: "与助手的连接已断开。请按“连接”重新开始。",
      unreachable: "无法连接到助手。服务器在运行吗？",
      needKey: "这个服务器需要访问密钥。请按“连接”输入密钥。",
      badKey: "服务器不接受这个访问密钥。请检查后重新输入。",
      other: (detail) => (detail ? "出了问题：" + detail : "出了问题。"),
    },
  },
};
// server error codes that have plain words of their own (the others show the server's message)
const PLAIN_CODES = ["busy", "not_ready", "engine_failed", "internal", "rate_limited",
  "session_expired", "idle_timeout", "draining"];
const RECONNECT_MS = 1000; // after session.closing: the balancer sends the new session elsewhere
const LANGUAGE_KEY = "voxlens.language";  // localStorage: the picker's last choice
const ACCESS_KEY = "voxlens.key";  // localStorage: the access key given, until "Forget key"

// State the page exposes for people (the DOM) and for tests (window.voxlens).
const vx = (window.voxlens = {
  state: "idle", sessionId: null, finals: [], replies: {}, metrics: [], errors: [],
  scene: null, audioEnergy: 0, receivedMs: 0, playedMs: 0, interrupted: [], playbackReports: 0,
  language: null,  // the spoken language sent with the last offer (null: detected)
  labels: "en",  // the language of the page's labels
  keyPrompts: 0, tokens: 0,  // times the page asked for an access key; tokens minted
  reconnects: 0,  // new sessions started after a session.closing
});

let pc = null, channel = null, micStream = null, camStream = null, statsTimer = null;
// The reply playing now, where its first sound was in the received stream, and the audio
// energy at reply.started (its first sound is when the energy starts growing again).
let replyTurn = null, replyStartMs = null, replyEnergy = 0;
// What the labels say, kept so that a change of language can write them again.
let stateLabel = "notConnected", errorShown = null, latencyMs = null, keyError = null;
let accessKey = null;  // the access key, where the browser's storage is off

const words = () => LABELS[vx.labels];
const pickedLanguage = () => $("language").value || null;

function stored(name) {
  try { return localStorage.getItem(name); } catch (e) { return null; }  // storage off
}

// Keep (or with null, remove) a value; false when the browser's storage is off.
function store(name, value) {
  try {
    if (value === null) localStorage.removeItem(name);
    else localStorage.setItem(name, value);
    return true;
  } catch (e) { return false; }
}

function setState(state, label) {
  vx.state = state;
  stateLabel = label;
  const el = $("state");
  el.className = "state " + state;
  el.textContent = words().state[label];
}

// An error is null (none) or [key, detail], the key one of LABELS.*.error.
function errorText(error) {
  const text = words().error[error[0]];
  return typeof text === "function" ? text(error[1] || "") : text;
}

function showError(error) {
  errorShown = error;
  const el = $("error");
  el.textContent = error ? errorText(error) : "";
  el.hidden = !error;
  if (error) vx.errors.push(el.textContent);
}

// A server error code as an error to show: its plain words, or else the server's message.
function plainError(code, message) {
  return PLAIN_CODES.includes(code) ? [code] : ["other", message];
}

// ---- access key and tokens (docs/PROTOCOL.md, "Access: keys, tokens, origins") ----------

const keptKey = () => stored(ACCESS_KEY) || accessKey;

function showForgetKey() {
  $("forget-key").hidden = !keptKey();
}

function keepKey(key) {
  accessKey = store(ACCESS_KEY, key) ? null : key;
  showForgetKey();
}

function forgetKey() {
  accessKey = null;
  store(ACCESS_KEY, null);
  showForgetKey();
}

function showKeyError(error) {
  keyError = error;
  const el = $("key-error");
  el.textContent = error ? errorText(error) : "";
  el.hidden = !error;
  if (error) vx.errors.push(el.textContent);
}

// Ask the person for an access key (a modal dialog: focus in the field, Esc cancels); after a
// refused key, saying so. Resolves to the key, or null when they cancel.
function askForKey(refused) {
  const dialog = $("key-dialog"), input = $("key-input");
  showKeyError(refused ? ["badKey"] : null);
  input.value = "";
  dialog.returnValue = "";
  vx.keyPrompts += 1;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = input.value.trim();
      input.value = "";
      resolve(dialog.returnValue === "use" && key ? key : null);
    }, { once: true });
    dialog.showModal();
  });
}

// POST /v1/tokens with `key` (or none): {token} ("" from a server without /v1/tokens), or
// {refused: true} when the server wants a key or another one (401). Anything else throws.
async function mint(key) {
  const resp = await fetch("/v1/tokens", {
    method: "POST", headers: key ? { Authorization: "Bearer " + key } : {},
  });
  if (resp.status === 401) return { refused: true };
  if (resp.status === 404) return { token: "" };
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok || typeof body.token !== "string") {
    throw Object.assign(new Error(body.message || ""), { code: body.error || "http_" + resp.status });
  }
  vx.tokens += 1;
  return { token: body.token };
}

// A new token for one connection, minted with the kept key (a server without keys mints one
// without). When the server wants a key, the person is asked for one — again, saying why,
// while the server refuses it — and the key it accepts is kept for the next time. null when
// the person cancels.
async function freshToken() {
  let key = keptKey(), refused = false;
  for (;;) {
    const answer = await mint(key);
    if (!answer.refused) {
      if (key && key !== keptKey()) keepKey(key);
      return answer.token;
    }
    if (key) {
      refused = true;
      if (key === keptKey()) forgetKey();  // a kept key that no longer works
    }
    key = await askForKey(refused);
    if (key === null) return null;
  }
}

function postOffer(body, token) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  return fetch("/offer", { method: "POST", headers, body });
}

// Every label on the page in the labels' language, and the html lang attribute with them (it
// picks the Chinese fonts and tells screen readers which voice to read with).
function showLabels() {
  const w = words();
  document.documentElement.lang = vx.labels === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = w[el.dataset.i18n];
  for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = w[el.dataset.i18nTitle];
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
    el.placeholder = w[el.dataset.i18nPlaceholder];
  }
  for (const el of document.querySelectorAll("[data-i18n-aria-label]")) {
    el.setAttribute("aria-label", w[el.dataset.i18nAriaLabel]);
  }
  $("connect").textContent = pc ? w.disconnect : w.connect;
  $("mute").textContent = $("mute").getAttribute("aria-pressed") === "true" ? w.unmute : w.mute;
  $("state").textContent = w.state[stateLabel];
  if (errorShown) $("error").textContent = errorText(errorShown);
  if (keyError) $("key-error").textContent = errorText(keyError);
  $("latency").textContent = latencyMs === null ? w.latencyNone : w.latency(latencyMs);
  $("log").dataset.empty = w.empty;
  for (const li of document.querySelectorAll("#log li")) {
    li.dataset.who = li.classList.contains("user") ? w.you : w.assistant;
  }
  for (const span of document.querySelectorAll("#log .ms")) span.textContent = w.ms(Number(span.dataset.ms));
  showLanguageNote();
}

// A language picked while connected is used from the next connection; the page says so.
function showLanguageNote() {
  const note = $("language-note");
  note.hidden = !pc || pickedLanguage() === vx.language;
  note.textContent = note.hidden ? "" : words().nextConnect;
}

function chooseLanguage(value, remember) {
  const picker = $("language");
  if (![...picker.options].some((o) => o.value === value)) {
    // another language code from ?language= (it goes to the server as it is), listed as itself
    const option = document.createElement("option");
    option.value = option.textContent = value;
    picker.appendChild(option);
  }
  picker.value = value;
  vx.labels = value === "zh" ? "zh" : "en";
  if (remember) store(LANGUAGE_KEY, value);
  showLabels();
}

function say(kind, text, turnId) {
  const li = document.createElement("li");
  li.className = kind;
  li.dataset.who = kind === "user" ? words().you : words().assistant;
  if (turnId !== undefined) li.dataset.turn = String(turnId);
  li.textContent = text;
  $("log").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function send(message) {
  if (channel && channel.readyState === "open") channel.send(JSON.stringify(message));
}

function onEvent(ev) {
  switch (ev.type) {
    case "session.ready":
      // turn ids start again in each session: an earlier session's reply lines stay in the
      // log but give up their ids, so this session's events update only its own lines
      for (const li of document.querySelectorAll("#log li[id^='reply-']")) li.removeAttribute("id");
      vx.sessionId = ev.session_id;
      $("models").textContent = Object.values(ev.models || {}).join(" · ");
      setState("listening", "listening");
      break;
    case "speech.started":
      setState("listening", "hearing");
      break;
    case "transcript":
      if (ev.final) {
        $("partial").textContent = "";
        vx.finals.push(ev.text);
        say("user", ev.text, ev.turn_id);
        setState("thinking", "thinking");
      } else {
        $("partial").textContent = ev.text;
      }
      break;
    case "reply.started": {
      $("reply").muted = false;
      replyTurn = ev.turn_id;
      replyStartMs = null;
      replyEnergy = vx.audioEnergy;
      vx.replies[ev.turn_id] = "";
      const li = say("assistant", "", ev.turn_id);
      li.id = "reply-" + ev.turn_id;
      setState("speaking", "speaking");
      break;
    }
    case "reply.text": {
      vx.replies[ev.turn_id] = (vx.replies[ev.turn_id] || "") + ev.delta;
      const li = $("reply-" + ev.turn_id);
      if (li) li.textContent = vx.replies[ev.turn_id];
      break;
    }
    case "reply.done":
      vx.replies[ev.turn_id] = ev.text;
      break;
    case "reply.interrupted": {
      // the server cut the reply where we were: show what was heard, stop reporting
      vx.interrupted.push(ev);
      const li = $("reply-" + ev.turn_id);
      if (li) {
        li.textContent = (ev.heard_text || "") + " …";
        li.classList.add("interrupted");
      }
      if (replyTurn === ev.turn_id) replyTurn = null;
      setState("listening", "listening");
      break;
    }
    case "metrics": {
      vx.metrics.push(ev);
      const ms = Math.round(ev.stages.first_audio_sent);
      latencyMs = ms;
      $("latency").textContent = words().latency(ms);
      const li = $("reply-" + ev.turn_id);
      if (li) {
        const span = document.createElement("span");
        span.className = "ms";
        span.dataset.ms = String(ms);
        span.textContent = words().ms(ms);
        li.appendChild(span);
      }
      break;
    }
    case "scene":
      vx.scene = ev.text;
      $("scene").textContent = ev.text;
      $("scene").hidden = false;
      break;
    case "error":
      showError(plainError(ev.code, ev.message));
      if (ev.fatal) disconnect("error");
      break;
    case "session.closing": // the server is shutting down on purpose: a new session, elsewhere
      disconnect("error");
      showError(["closing"]);
      vx.reconnects += 1;
      if (ev.reconnect) setTimeout(() => { if (!pc) connect(); }, RECONNECT_MS * (1 + Math.random()));
      break;
  }
}

async function pollStats() {
  if (!pc) return;
  const stats = await pc.getStats();
  stats.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      vx.audioEnergy = s.totalAudioEnergy || 0;
      vx.receivedMs = Math.round((s.totalSamplesDuration || 0) * 1000);
      const level = s.audioLevel || 0;
      if (vx.state === "speaking" && replyTurn !== null) {
        // playback report for barge-in: reply audio played since its first sound
        if (replyStartMs === null && vx.audioEnergy > replyEnergy + 1e-6) replyStartMs = vx.receivedMs;
        vx.playedMs = replyStartMs === null ? 0 : Math.max(0, vx.receivedMs - replyStartMs);
        send({ type: "playback", turn_id: replyTurn, played_ms: vx.playedMs });
        vx.playbackReports += 1;
        if (level < 0.001 && vx.replies[replyTurn] !== undefined && vx.metrics.some((m) => m.turn_id === replyTurn)) {
          setState("listening", "listening");
        }
      }
    }
  });
}

function waitForIce(peer, timeoutMs) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { peer.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (peer.iceGatheringState === "complete") done(); };
    peer.addEventListener("icegatheringstatechange", check);
    setTimeout(done, timeoutMs);
  });
}

function failed(error, state) {
  showError(error);
  cleanup();
  setState(state || "error", "notConnected");
}

// A failure to show: the page's own reason (e.key), the server's error code, or none reached.
const failure = (e) => (e.key ? [e.key] : e.code ? plainError(e.code, e.message) : ["unreachable"]);

async function connect() {
  showError(null);
  $("connect").disabled = true;
  setState("idle", "connecting");
  let token;
  try {
    token = await freshToken();
  } catch (e) {
    failed(failure(e));
    return;
  }
  if (token === null) {  // the person did not give a key
    failed(["needKey"], "idle");
    return;
  }
  try {
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    if ($("use-camera").checked) {
      camStream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
      $("preview").srcObject = camStream;
      $("preview").hidden = false;
    }
  } catch (e) {
    const denied = e && (e.name === "NotAllowedError" || e.name === "SecurityError");
    showError(denied ? ["micDenied"] : ["noDevice", e.message || e.name]);
    cleanup();
    setState("error", "noMicrophone");
    return;
  }
  let iceServers = [];  // the server's list (empty by default: no STUN server is ever assumed)
  try {  // with the token: a server with keys lists its TURN credentials only then
    const config = await fetch("/webrtc/config",
                               token ? { headers: { Authorization: "Bearer " + token } } : {});
    iceServers = (await config.json()).iceServers || [];
  } catch (e) { /* keep none */ }
  pc = new RTCPeerConnection({ iceServers });
  channel = pc.createDataChannel("events");
  channel.onmessage = (m) => onEvent(JSON.parse(m.data));
  pc.addTransceiver(micStream.getAudioTracks()[0], { direction: "sendrecv", streams: [micStream] });
  if (camStream) pc.addTransceiver(camStream.getVideoTracks()[0], { direction: "sendonly" });
  pc.ontrack = (e) => { $("reply").srcObject = e.streams[0] || new MediaStream([e.track]); };
  pc.onconnectionstatechange = () => {
    if (pc && (pc.connectionState === "failed" || pc.connectionState === "disconnected")) {
      showError(["lost"]);
      disconnect("lost");
    }
  };
  vx.language = pickedLanguage();
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc, 3000);
    // the browser cancels echo itself (getUserMedia echoCancellation), so the server need not
    const body = JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer",
                                  language: vx.language, echo_cancellation: true });
    let resp = await postOffer(body, token);
    if (resp.status === 401) {  // the token expired on the way, or its key was removed: once more
      token = await freshToken();
      if (token === null) throw Object.assign(new Error(), { key: "needKey" });
      resp = await postOffer(body, token);
    }
    const answer = await resp.json();
    if (!resp.ok) throw Object.assign(new Error(answer.message), { code: answer.error });
    await pc.setRemoteDescription(answer);
  } catch (e) {
    failed(failure(e));
    return;
  }
  statsTimer = setInterval(pollStats, 250);
  $("connect").textContent = words().disconnect;
  $("connect").disabled = false;
  for (const id of ["mute", "stop", "text", "send"]) $(id).disabled = false;
  showLanguageNote();
}

function cleanup() {
  clearInterval(statsTimer);
  statsTimer = null;
  if (pc) pc.close();
  pc = null;
  channel = null;
  for (const s of [micStream, camStream]) if (s) s.getTracks().forEach((t) => t.stop());
  micStream = camStream = null;
  $("preview").hidden = true;
  $("connect").textContent = words().connect;
  $("connect").disabled = false;
  $("mute").setAttribute("aria-pressed", "false");
  $("mute").textContent = words().mute;
  for (const id of ["mute", "stop", "text", "send"]) $(id).disabled = true;
  showLanguageNote();
}

function disconnect(reason) {
  send({ type: "session.end" });
  cleanup();
  if (reason !== "error" && reason !== "lost") setState("idle", "notConnected");
  else setState("error", "disconnected");
}

$("connect").onclick = () => (pc ? disconnect("user") : connect());
$("mute").onclick = () => {
  if (!micStream) return;
  const track = micStream.getAudioTracks()[0];
  track.enabled = !track.enabled;
  $("mute").setAttribute("aria-pressed", String(!track.enabled));
  $("mute").textContent = track.enabled ? words().mute : words().unmute;
};
// Stop silences the current reply here at once and tells the server, which cuts it (its
// reply.interrupted says what was heard); the next reply plays again.
$("stop").onclick = () => {
  $("reply").muted = true;
  send({ type: "interrupt" });
  setState("listening", "listening");
};
$("typed").onsubmit = (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  send({ type: "text", text });
  say("user", text);
  setState("thinking", "thinking");
  $("text").value = "";
};
// The labels change at once; the spoken language is sent with the next connection.
$("language").onchange = () => chooseLanguage($("language").value, true);
// The key stays out of this browser from now on (the next connection asks again if need be).
$("forget-key").onclick = () => {
  forgetKey();
  $("connect").focus();
};

// ?language= picks the language of this visit (en, zh, another code, or auto) without
// remembering it; otherwise the picker's last choice; otherwise Auto.
const asked = params.has("language") ? params.get("language").trim().toLowerCase()
  : stored(LANGUAGE_KEY);
chooseLanguage(asked && asked !== "auto" ? asked : "", false);
showForgetKey();
if (params.get("camera") === "1") $("use-camera").checked = true;
if (params.get("autostart") === "1") connect();
