"""Frontend worker processes: gRPC/REST frontends in N processes feeding one engine process.

The engine (the main process) owns the repository, the schedulers, the instances, statistics, the
control plane and /metrics; each worker runs the unchanged frontends against a ``RemoteDataPlane``
that forwards to the engine over a Unix socket, with tensors handed over in shared memory.
docs/workers.md describes the process layout and the protocol.
"""
