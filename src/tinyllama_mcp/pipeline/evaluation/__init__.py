"""The evaluate stage: one servable model measured on chat data, preference pairs, prompts and local lm-eval tasks.

run.py is the stage (torch); scoring.py the loss and preference metrics; harness.py runs lm-eval in process;
task_files.py checks local task folders without torch (the server's preflight uses it too).
"""
