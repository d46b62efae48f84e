"""Where evaluations run: the candidate/result contract, the in-process pool, Ray actors and the
cluster, the worker host (retries, penalties), and the default worker (`fitness.FitnessWorker`:
build a candidate, score it).

May import: `evomerge.candidates`, `evomerge.scoring`, `evomerge.merge`, `evomerge.io`. A worker
sees recipes and payloads, never genomes: it must not import `evomerge.search`."""
