"""Where tasks run: the nodes of the allocation, what each task books on them, and how it is launched there."""
