"""Tests of ratelimit."""
