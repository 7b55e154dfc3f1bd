"""The trio shell around :mod:`smapws._core`: sockets, tasks, clocks."""
