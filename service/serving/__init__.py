"""The running service, independent of the transport: its state, its lifecycle, one inference path.

HTTP (service/http/) and gRPC (service/grpc/) both serve through this package, so a request behaves
the same whichever binding brought it, and requests of both bindings share one batcher.
"""
