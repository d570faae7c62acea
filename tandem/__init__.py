"""Tandem's shared core: what two processes both need (slot layout, link messages,
model resolution) and the generated protobuf modules (``tandem.v1``,
``tandem.internal.v1``). Process packages import this, never each other."""
