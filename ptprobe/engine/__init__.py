"""The engine: one event loop and the parts that subscribe to its events.

* :mod:`~ptprobe.engine.events` -- wait statuses decoded into typed event values.
* :mod:`~ptprobe.engine.loop` -- the event loop, the only caller of ``waitpid``;
  the registry of traced threads and processes; stopping the world.
* :mod:`~ptprobe.engine.lifecycle` -- starting and seizing, new threads and
  processes, exec, exit, letting children go, detaching threads.
* :mod:`~ptprobe.engine.hits` -- probe hits: int3 and slot stops, the counting
  hot path, finishing slots, stepping over displaced instructions.

The parts meet through the loop's dispatch table and a few hooks the session
wires, never through each other's private methods (see ``docs/design.md``,
"Layers").
"""
