"""placeholder"""
def cmd_lens(args, ctx): raise NotImplementedError
def cmd_heads(args, ctx): raise NotImplementedError
def cmd_patch(args, ctx): raise NotImplementedError
