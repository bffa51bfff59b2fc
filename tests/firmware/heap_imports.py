# Runs under micropython (tests/test_firmware_memory.py): the heap the firmware's
# imports hold once loaded, from whatever MICROPYPATH offers (source or .mpy).
import gc

gc.collect()
a0 = gc.mem_alloc()
import hw  # noqa: E402, F401
import sense.node  # noqa: E402, F401
import umqtt.simple  # noqa: E402, F401

gc.collect()
print("import_bytes=%d" % (gc.mem_alloc() - a0))  # noqa: UP031
print("free_bytes=%d" % gc.mem_free())  # noqa: UP031
