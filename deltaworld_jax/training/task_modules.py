"""Imports every module that registers a Task (see tasks.py). One line per model family."""
