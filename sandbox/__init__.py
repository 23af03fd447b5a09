"""Run one command in an unprivileged, hermetic Linux sandbox. Never imports reprobuild.

``sandbox.spec`` is the interface (SandboxSpec, Mount, SandboxResult, Runner);
``sandbox.runner.start()`` starts the fork server that implements Runner, and
``sandbox.runner.probe()`` says whether this host can; ``python -m sandbox`` runs one
command for debugging. Inside: ``sandbox.server`` (the loop), ``sandbox.child`` (pid 1),
``sandbox.plan`` (what a sandbox looks like, as data), ``sandbox.operations`` (each
namespace and mount step, with ``execute()`` and ``describe()``), ``sandbox.seccomp``,
``sandbox.syscalls`` (ctypes), ``sandbox.userns`` (why user namespaces are refused).
"""
