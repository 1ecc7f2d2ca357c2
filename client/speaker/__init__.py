"""``voxlens speaker``, the smart-speaker / car client: its audio (``audio``: sound devices or
WAV files) and the client itself (``app``)."""
