"""What runs models inside clawd: jobs and their fair queue, the worker thread that owns each
engine, the manager that keeps models resident within the memory fit, the state keeper
(snapshots, sessions, prefix pool), embedding models and the answer cache."""
