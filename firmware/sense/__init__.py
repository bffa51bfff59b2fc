# OpenSense node firmware: logic modules. None of them imports machine or network;
# the hardware comes from hw.board() (hw/__init__.py), chosen in one place.
