"""The bodies of the stages, one module per kind of step; pipeline/stages.py builds the graph
that names them. A step never imports the graph: what it reads is its stage's settings, arguments
and inputs, and its code list names its own module."""
