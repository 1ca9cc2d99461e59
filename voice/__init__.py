"""Speech: audio codecs, STT, TTS, VAD and turn detection, playout accounting."""
