"""clawd's own admin API under `/admin/…` (health and metrics at the root): one router per noun
the daemon owns. The CLI reaches the daemon's data only through these routes. Over TCP they need
the token, and changing routes (anything but GET) answer 403 unless `[tcp] admin = true`."""
