"""Baton: multi-model cooperative denoising as a cluster of gRPC services."""

import os

# Before anything loads grpc: grpcio 1.80+ restarts its poller in a child that subprocess.Popen
# forks, and the child aborts on the closed epoll fd before it can exec (grpc/grpc#43055). Baton
# never forks a process that keeps using gRPC, so it needs no fork support; the test harness and
# `baton up`, which hold channels while they start services, need it off.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
