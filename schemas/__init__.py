"""Pydantic configs, Arrow schemas of every table that crosses a task boundary, GX suites."""
