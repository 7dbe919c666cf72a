"""Tests of fetch."""
