"""The application layer beside the commands: what a command serves beyond one run (the browser demo).

It stands on the core and on ovseg, and no command imports another through it: the commands
(`emerdiff.cli`) build its objects and run them.
"""
