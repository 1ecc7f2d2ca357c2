// voxlens web page: microphone (+ optional camera) over WebRTC to POST /offer,
// events over the "events" data channel (docs/PROTOCOL.md). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// State the page exposes for people (the DOM) and for tests (window.voxlens).
const vx = (window.voxlens = {
  state: "idle", sessionId: null, finals: [], replies: {}, metrics: [], errors: [],
  scene: null, audioEnergy: 0, receivedMs: 0, playedMs: 0, interrupted: [], playbackReports: 0,
});

let pc = null, channel = null, micStream = null, camStream = null, statsTimer = null;
// The reply playing now, where its first sound was in the received stream, and the audio
// energy at reply.started (its first sound is when the energy starts growing again).
let replyTurn = null, replyStartMs = null, replyEnergy = 0;

function setState(state, label) {
  vx.state = state;
  const el = $("state");
  el.className = "state " + state;
  el.textContent = label || state;
}

function showError(message) {
  if (message) vx.errors.push(message);
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function say(kind, text, turnId) {
  const li = document.createElement("li");
  li.className = kind;
  if (turnId !== undefined) li.dataset.turn = String(turnId);
  li.textContent = text;
  $("log").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function send(message) {
  if (channel && channel.readyState === "open") channel.send(JSON.stringify(message));
}

function plainError(code, message) {
  switch (code) {
    case "busy": return "The assistant is busy with other people right now. Please try again in a moment.";
    case "not_ready": return "The assistant is still starting up. Please try again in a few seconds.";
    case "engine_failed": return "Sorry, something went wrong while answering. Please try again.";
    default: return message || "Something went wrong.";
  }
}

function onEvent(ev) {
  switch (ev.type) {
    case "session.ready":
      vx.sessionId = ev.session_id;
      $("models").textContent = Object.values(ev.models || {}).join(" · ");
      setState("listening", "listening");
      break;
    case "speech.started":
      setState("listening", "listening…");
      break;
    case "transcript":
      if (ev.final) {
        $("partial").textContent = "";
        vx.finals.push(ev.text);
        say("user", ev.text, ev.turn_id);
        setState("thinking", "thinking…");
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
      $("latency").textContent = `voice-to-voice (server): ${ms} ms`;
      const li = $("reply-" + ev.turn_id);
      if (li) {
        const span = document.createElement("span");
        span.className = "ms";
        span.textContent = `${ms} ms`;
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

async function connect() {
  showError("");
  $("connect").disabled = true;
  setState("idle", "connecting…");
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
    showError(denied
      ? "voxlens needs your microphone. Please allow microphone access in the browser and try again."
      : "No microphone (or camera) could be opened: " + (e.message || e.name));
    cleanup();
    setState("error", "no microphone");
    return;
  }
  let iceServers = [];  // the server's list (empty by default: no STUN server is ever assumed)
  try { iceServers = (await (await fetch("/webrtc/config")).json()).iceServers || []; } catch (e) { /* keep none */ }
  pc = new RTCPeerConnection({ iceServers });
  channel = pc.createDataChannel("events");
  channel.onmessage = (m) => onEvent(JSON.parse(m.data));
  pc.addTransceiver(micStream.getAudioTracks()[0], { direction: "sendrecv", streams: [micStream] });
  if (camStream) pc.addTransceiver(camStream.getVideoTracks()[0], { direction: "sendonly" });
  pc.ontrack = (e) => { $("reply").srcObject = e.streams[0] || new MediaStream([e.track]); };
  pc.onconnectionstatechange = () => {
    if (pc && (pc.connectionState === "failed" || pc.connectionState === "disconnected")) {
      showError("The connection to the assistant was lost. Press Connect to start again.");
      disconnect("lost");
    }
  };
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc, 3000);
    const resp = await fetch("/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      // the browser cancels echo itself (getUserMedia echoCancellation), so the server need not
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", language: params.get("language"),
                             echo_cancellation: true }),
    });
    const answer = await resp.json();
    if (!resp.ok) throw Object.assign(new Error(answer.message), { code: answer.error });
    await pc.setRemoteDescription(answer);
  } catch (e) {
    showError(e.code ? plainError(e.code, e.message)
      : "The assistant could not be reached. Is the server running?");
    cleanup();
    setState("error", "not connected");
    return;
  }
  statsTimer = setInterval(pollStats, 250);
  $("connect").textContent = "Disconnect";
  $("connect").disabled = false;
  for (const id of ["mute", "stop", "text", "send"]) $(id).disabled = false;
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
  $("connect").textContent = "Connect";
  $("connect").disabled = false;
  for (const id of ["mute", "stop", "text", "send"]) $(id).disabled = true;
}

function disconnect(reason) {
  send({ type: "session.end" });
  cleanup();
  if (reason !== "error" && reason !== "lost") setState("idle", "not connected");
  else setState("error", "disconnected");
}

$("connect").onclick = () => (pc ? disconnect("user") : connect());
$("mute").onclick = () => {
  if (!micStream) return;
  const track = micStream.getAudioTracks()[0];
  track.enabled = !track.enabled;
  $("mute").setAttribute("aria-pressed", String(!track.enabled));
  $("mute").textContent = track.enabled ? "Mute" : "Unmute";
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
  setState("thinking", "thinking…");
  $("text").value = "";
};

if (params.get("camera") === "1") $("use-camera").checked = true;
if (params.get("autostart") === "1") connect();
