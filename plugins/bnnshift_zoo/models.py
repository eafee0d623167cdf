def register_all(api):
    pass
