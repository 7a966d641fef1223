"""Elastic MoE: weight publishing, expert placement and autoscaling policies."""
