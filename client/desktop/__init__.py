"""``voxlens desktop``: the network side (``app``) with its devices (``audio``, ``camera``), the
app's own events (``events``), what the window shows (``state``), the Tk window (``window``, a
view that knows nothing of the network) and the command itself (``main``: headless, or the
window and the network on their threads). Imports point one way: ``main`` imports ``app`` and
``window``; neither of those imports the other."""
