"""Thin click commands, one per MLproject entry point: parse → config → pipeline call."""
