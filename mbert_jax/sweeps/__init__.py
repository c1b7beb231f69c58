"""Strategy sweeps: what a sweep file defines (`sweep`), the launch.py command of each run
(`commands`), running, resuming or emitting a sweep and its command line (`runner`), and the
results table and plots (`report`)."""
