# The one place the hardware is chosen. Everything else calls hw.board() and uses the
# object it returns; no other module imports machine or network.
import sys

_board = []


def board():
    if not _board:
        if sys.platform == "esp32":
            from hw.esp32 import Board
        else:
            from hw.sim import Board  # the unix port: a simulated board for tests and the demo
        _board.append(Board())
    return _board[0]


def reset():
    # main.py's last resort, usable when making the board itself failed
    if sys.platform == "esp32":
        import machine

        machine.reset()
    else:
        from hw.sim import RESET_EXIT

        sys.exit(RESET_EXIT)
