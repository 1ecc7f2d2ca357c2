"""The shared client library: access keys and tokens (``access``), the server's events as typed
values (``events``), what a client saw of a conversation (``eventlog``), reconnecting
(``reconnect``), one playback buffer and one playback reporter (``playback``), the WebSocket and
WebRTC clients (``ws_client``, ``rtc_client``), device links over MQTT or a WebSocket
(``links``), console helpers (``console``), WAV files (``wavio``) and a simulated echo room
(``acoustics``). It imports no app package."""
