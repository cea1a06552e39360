"""Worklist integration: the priority policy (:mod:`service.worklist.policy`) and its store operations."""
