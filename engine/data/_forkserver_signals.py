"""Imported by the DataLoader workers' fork server (`engine.data.loader.WORKER_PRELOAD`) and nowhere else: the server
ignores the stop signals, as the workers do (`engine.data.loader.worker_init`).

A scheduler (SLURM, `timeout`, a `kill` of the process group) signals every process of the job, the fork server
included. A server killed by SIGTERM takes its workers with it: each worker's watchdog reads its parent's death as the
main process's and exits, and the main process, which still needs batches until the step at which all ranks stop,
crashes instead of saving. The server still ends with the main process (multiprocessing closes its pipe).
"""

from engine.data.loader import ignore_stop_signals

ignore_stop_signals()
