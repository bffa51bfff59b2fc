# Runs the case_* functions of one module under whichever Python runs this file
# (the real micropython from pytest; CPython imports the modules directly).
# Prints "ok <name>" or "FAIL <name> <error>" per case, then "done".
import sys

mod = __import__(sys.argv[1])
names = sys.argv[2:] or sorted(n for n in dir(mod) if n.startswith("case_"))
for n in names:
    try:
        getattr(mod, n)()
        print("ok", n)
    except Exception as e:  # report and go on: one failing case must not hide the others
        sys.print_exception(e) if hasattr(sys, "print_exception") else None
        print("FAIL", n, repr(e))
print("done")
