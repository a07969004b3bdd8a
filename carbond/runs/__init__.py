"""Runs for users who may not make cgroups themselves (docs/exec.md).

The daemon, which may write the cgroup tree, listens on a local Unix socket (`exec_socket`,
default /run/carbond/exec.sock). A caller names a project; the daemon, having checked with the
kernel's peer credentials who is asking, makes a run cgroup and moves the caller (or a child
of it) in, and out again at the end. `carbond exec` uses it where it cannot make a cgroup
itself (an SSH session), `carbond.track` always.
"""
