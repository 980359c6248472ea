"""Capacity planner models behind `pdcluster simulate`: hardware and model facts, prefill and decode step
times, the profile file, calibration, and the report; the event loop is cluster/tools/simulator.py."""
