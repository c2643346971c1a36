"""The daemon: owns time and concurrency around the engine (DESIGN.md, "Daemon")."""
