"""Code the tests share: fixtures, fakes, servers and the way they run the command line."""
